//! The figures, as Markdown tables (for the README) after progress lines
//! (on stderr, while the run goes on).

use std::time::Duration;

use peaqos_orchestrator::store::Backend;

use crate::burst;
use crate::scenarios::{Outcome, Scenario, Walk};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub(crate) fn progress(o: &Outcome) {
    eprintln!(
        "{:<50} {:>10.0}/s  p50 {:>9}  p99 {:>9}  errors {}",
        o.scenario.label(),
        o.per_second,
        ms(o.p50),
        ms(o.p99),
        o.errors
    );
    if let Some(e) = &o.first_error {
        eprintln!("    first error: {e}");
    }
    let n = o.operations.max(1) as f64;
    // How busy the cores were: what we measured over their time (the
    // rest is idle, or other work on the machine).
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let seconds = n / o.per_second.max(1e-9);
    let cpu = o.spent.server_cpu + o.spent.client_cpu + o.spent.postgres_cpu;
    eprintln!(
        "    per operation: server {:.0} µs CPU, load generator {:.0} µs, PostgreSQL {:.0} µs{}; \
         {:.0} % of the cores busy with these",
        o.spent.server_cpu / n * 1e6,
        o.spent.client_cpu / n * 1e6,
        o.spent.postgres_cpu / n * 1e6,
        o.spent
            .wal
            .map(|b| format!(", WAL {:.0} bytes", b as f64 / n))
            .unwrap_or_default(),
        100.0 * cpu / (seconds * cores).max(1e-9)
    );
}

pub(crate) fn burst_progress(r: &burst::Report) {
    eprintln!(
        "burst: {} of {} agents in {:.1} s ({:.0} agents/s), p99 {}, {} retries \
         ({} on 503, {} on 429, {} without an answer), {} failed",
        r.done,
        r.agents,
        r.wall.as_secs_f64(),
        r.done as f64 / r.wall.as_secs_f64().max(1e-9),
        ms(r.p99),
        r.retries,
        r.causes.unavailable_503,
        r.causes.rate_limited_429,
        r.causes.connection,
        r.failed
    );
    if !r.asked.is_empty() {
        let total = |v: &[u32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / 1e3;
        eprintln!(
            "burst waits after a Retry-After ({}): asked p50 {} ms, p99 {} ms; waited p50 {} ms, \
             p99 {} ms; longer than asked by p50 {} ms, p99 {} ms, max {} ms; \
             {:.0} agent-s waited, {:.0} of them past the time asked",
            r.asked.len(),
            pct(&r.asked, 500),
            pct(&r.asked, 990),
            pct(&r.waited, 500),
            pct(&r.waited, 990),
            pct(&r.overshoot, 500),
            pct(&r.overshoot, 990),
            r.overshoot.last().copied().unwrap_or(0),
            total(&r.waited),
            total(&r.overshoot),
        );
    }
}

/// The `per_mille`th of sorted milliseconds.
fn pct(sorted: &[u32], per_mille: usize) -> u32 {
    sorted[(sorted.len() - 1) * per_mille / 1000]
}

/// CPU and WAL per re-proof: the capacity model's inputs.
pub(crate) fn burst_cost(r: &burst::Report, spent: &crate::cost::Snapshot) {
    let n = r.done.max(1) as f64;
    eprintln!(
        "burst cost per re-proof: server {:.0} µs CPU, load generator {:.0} µs, \
         PostgreSQL {:.0} µs{}",
        spent.server_cpu / n * 1e6,
        spent.client_cpu / n * 1e6,
        spent.postgres_cpu / n * 1e6,
        spent
            .wal
            .map(|b| format!(", WAL {:.0} bytes", b as f64 / n))
            .unwrap_or_default()
    );
    // How busy the machine was: CPU spent by everything measured over the
    // cores' time during the burst (the rest is idle, or other work).
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let cpu = spent.server_cpu + spent.client_cpu + spent.postgres_cpu;
    eprintln!(
        "burst CPU: {cpu:.1} s of {:.1} s of {cores} cores' time ({:.0} % busy; \
         server {:.1} s, load generator {:.1} s, PostgreSQL {:.1} s)",
        r.wall.as_secs_f64() * cores,
        100.0 * cpu / (r.wall.as_secs_f64() * cores).max(1e-9),
        spent.server_cpu,
        spent.client_cpu,
        spent.postgres_cpu,
    );
}

pub(crate) struct Run<'a> {
    pub(crate) backend: Option<Backend>,
    pub(crate) replicas: usize,
    pub(crate) machines: usize,
    pub(crate) connections: usize,
    pub(crate) duration: u64,
    pub(crate) warmup: u64,
    pub(crate) outcomes: &'a [Outcome],
    pub(crate) walk: &'a Walk,
    pub(crate) burst: Option<&'a (burst::Report, burst::Plan, crate::cost::Snapshot)>,
}

pub(crate) fn print(run: &Run<'_>) {
    // The ceiling: the best /health figure of the run.
    let ceiling = run
        .outcomes
        .iter()
        .filter(|o| o.scenario == Scenario::Health)
        .map(|o| o.per_second)
        .fold(0.0, f64::max);
    let store = run.backend.map_or("running servers", Backend::name);
    println!(
        "\n{store}, {} replica(s), {} machines; {} connections, {} s per scenario after {} s \
         warm-up, {} cores\n",
        run.replicas,
        run.machines,
        run.connections,
        run.duration,
        run.warmup,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!("| scenario | per second | p50 | p99 | requests vs /health |");
    println!("|---|---:|---:|---:|---:|");
    for o in run.outcomes {
        let ratio = if ceiling > 0.0 {
            o.per_second * o.scenario.requests() as f64 / ceiling
        } else {
            0.0
        };
        println!(
            "| {} | {:.0} | {} | {} | {:.3} |",
            o.scenario.label(),
            o.per_second,
            ms(o.p50),
            ms(o.p99),
            ratio
        );
        if o.errors > 0 {
            println!("|   ({} errors) | | | | |", o.errors);
        }
    }
    trail_cost(run.outcomes);
    let w = run.walk;
    println!(
        "\nAll {} machines in {} pages of 500: {:.2} s; a page took {} on average in the first \
         tenth and {} in the last (ratio {:.2}).",
        w.machines,
        w.pages,
        w.total.as_secs_f64(),
        ms(w.first_tenth),
        ms(w.last_tenth),
        w.last_tenth.as_secs_f64() / w.first_tenth.as_secs_f64().max(1e-9)
    );
    if let Some((r, plan, spent)) = run.burst {
        let fits = r.failed == 0 && r.wall <= Duration::from_mins(1);
        println!(
            "\nPower-cut burst: {} agents back within {} s, each on its own connection \
             (at most {} open), re-proving (GET, challenge, signature, PATCH).\n",
            r.agents,
            plan.spread.as_secs(),
            plan.max_open
        );
        println!(
            "| agents done | failed | last done after | agents/s | p50 | p99 | p99 of one attempt | retries | within a minute |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        println!(
            "| {} | {} | {:.1} s | {:.0} | {} | {} | {} | {} | {} |",
            r.done,
            r.failed,
            r.wall.as_secs_f64(),
            r.done as f64 / r.wall.as_secs_f64().max(1e-9),
            ms(r.p50),
            ms(r.p99),
            ms(r.attempt_p99),
            r.retries,
            if fits { "yes" } else { "no" }
        );
        if let Some(e) = &r.first_error {
            println!("\nfirst error: {e}");
        }
        cost_table(r, spent);
    }
}

/// The capacity model's inputs (docs/performance.md), per agent done:
/// retried attempts are included, so these are upper bounds of one
/// re-proof's cost.
fn cost_table(r: &burst::Report, spent: &crate::cost::Snapshot) {
    let n = r.done.max(1) as f64;
    let us = |seconds: f64| format!("{:.0} µs", seconds / n * 1e6);
    println!(
        "\nCost per re-proof ({} done, retries included; CPU from /proc, PostgreSQL's \
         is every `postgres` process on this machine, WAL from `pg_current_wal_lsn()` \
         before and after the burst, whole cluster):\n",
        r.done
    );
    println!(
        "| server CPU | load generator CPU | PostgreSQL CPU | WAL per re-proof | WAL in all |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let (wal, wal_total) = spent.wal.map_or_else(
        || ("n/a".to_owned(), "n/a".to_owned()),
        |b| {
            (
                format!("{:.0} bytes", b as f64 / n),
                format!("{:.1} MB", b as f64 / 1e6),
            )
        },
    );
    println!(
        "| {} | {} | {} | {wal} | {wal_total} |",
        us(spent.server_cpu),
        us(spent.client_cpu),
        us(spent.postgres_cpu),
    );
}

/// Registrations with the audit trail against the baseline without it,
/// each the mean of its runs.
fn trail_cost(outcomes: &[Outcome]) {
    let mean = |scenario: Scenario| {
        let runs: Vec<&Outcome> = outcomes.iter().filter(|o| o.scenario == scenario).collect();
        (!runs.is_empty()).then(|| {
            let n = runs.len() as f64;
            let rate = runs.iter().map(|o| o.per_second).sum::<f64>() / n;
            let p99 = runs.iter().map(|o| o.p99.as_secs_f64()).sum::<f64>() / n;
            (rate, p99)
        })
    };
    if let (Some((with, with_p99)), Some((without, without_p99))) =
        (mean(Scenario::Flow), mean(Scenario::FlowUntrailed))
    {
        println!(
            "\nAudit trail: {with:.0} registrations/s with it, {without:.0}/s without \
             (ratio {:.3}); p99 {:.2} ms against {:.2} ms (ratio {:.3}).",
            with / without.max(1e-9),
            with_p99 * 1e3,
            without_p99 * 1e3,
            with_p99 / without_p99.max(1e-9)
        );
    }
}
