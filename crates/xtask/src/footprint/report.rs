//! The figures of all runs, and the markdown the README takes: one table,
//! the median of the runs with their range, the agent against the baseline.

use std::fmt::Write as _;
use std::time::Duration;

use super::procfs::Sample;

const MIB: f64 = 1024.0 * 1024.0;

/// Stripped executables, in bytes.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    pub(crate) agent: u64,
    pub(crate) baseline: u64,
    pub(crate) boards: Vec<BoardSize>,
}

/// The agent cross-built for a board (`cargo xtask arm`'s build): its
/// Rust target, and its size or why it was not built.
pub(crate) type BoardSize = (&'static str, Result<u64, String>);

/// From exec to the agent's milestones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StartTimes {
    pub(crate) first_signature: Duration,
    pub(crate) active: Duration,
}

/// A process at the end of the idle period.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Idle {
    pub(crate) end: Sample,
    /// CPU ticks spent during the idle period.
    pub(crate) ticks: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentRun {
    pub(crate) start: StartTimes,
    pub(crate) idle: Idle,
}

/// One run: a fresh orchestrator, the baseline and the agents, side by side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) agent: AgentRun,
    pub(crate) agent_mqtt: Option<AgentRun>,
    pub(crate) baseline: Idle,
    /// From the baseline's exec to the answer of its GET /health.
    pub(crate) baseline_answer: Duration,
}

/// Everything the table needs.
#[derive(Debug)]
pub(crate) struct Report {
    /// The command line that reproduces it.
    pub(crate) command: String,
    /// Machine and kernel, one line.
    pub(crate) machine: String,
    /// The MQTT broker of the MQTT-on variant, if it ran.
    pub(crate) broker: Option<String>,
    pub(crate) idle: Duration,
    /// The kernel's clock tick, in which CPU time is counted.
    pub(crate) tick: Duration,
    pub(crate) sizes: Sizes,
    pub(crate) runs: Vec<Run>,
}

/// Median, minimum and maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Spread {
    /// `None` for no values. The median of an even count is the mean of
    /// the middle two.
    pub(crate) fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => values[n / 2],
            _ => f64::midpoint(values[n / 2 - 1], values[n / 2]),
        };
        Some(Self {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }

    /// `median unit`, with ` (min–max)` when the runs differ.
    fn show(&self, decimals: usize, unit: &str) -> String {
        self.show_with(decimals, unit, "")
    }

    /// As [`Spread::show`], with `also` (another unit) after the median.
    fn show_with(&self, decimals: usize, unit: &str, also: &str) -> String {
        let number = |v: f64| thousands(v, decimals);
        let mut text = format!("{} {unit}{also}", number(self.median));
        if number(self.min) != number(self.max) {
            let _ = write!(text, " ({}–{})", number(self.min), number(self.max));
        }
        text
    }
}

/// `1234567.8` as `1,234,568` (or with `decimals` places).
pub(crate) fn thousands(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let (sign, digits) = whole
        .strip_prefix('-')
        .map_or(("", whole), |digits| ("-", digits));
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if fraction.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{fraction}")
    }
}

fn bytes(size: u64) -> String {
    format!(
        "{} B ({:.2} MiB)",
        thousands(size as f64, 0),
        size as f64 / MIB
    )
}

fn ratio(agent: f64, baseline: f64) -> String {
    if baseline > 0.0 {
        format!("{:.2}", agent / baseline)
    } else {
        "–".to_owned()
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One row of the table, per process column.
struct Row {
    label: String,
    agent: String,
    agent_mqtt: String,
    baseline: String,
    ratio: String,
    goal: &'static str,
}

impl Report {
    fn spread(&self, f: impl Fn(&Run) -> Option<f64>) -> Option<Spread> {
        Spread::of(self.runs.iter().filter_map(f))
    }

    /// A measure's columns: the agents, the baseline's counterpart if it
    /// has one, and the agent/baseline ratio of the medians.
    fn row(
        &self,
        label: String,
        goal: &'static str,
        agent: impl Fn(&AgentRun) -> f64,
        baseline: impl Fn(&Run) -> Option<f64>,
        show: impl Fn(&Spread) -> String,
    ) -> Row {
        let plain = self.spread(|r| Some(agent(&r.agent)));
        let mqtt = self.spread(|r| r.agent_mqtt.as_ref().map(&agent));
        let base = self.spread(baseline);
        let shown = |s: Option<Spread>| s.as_ref().map_or_else(String::new, &show);
        let ratio = match (plain, base) {
            (Some(a), Some(b)) if b.median > 0.0 => {
                let mut text = ratio(a.median, b.median);
                if let Some(m) = mqtt {
                    let _ = write!(text, " (MQTT on: {})", ratio(m.median, b.median));
                }
                text
            }
            (_, Some(_)) => "–".to_owned(),
            (_, None) => String::new(),
        };
        Row {
            label,
            agent: shown(plain),
            agent_mqtt: shown(mqtt),
            baseline: shown(base),
            ratio,
            goal,
        }
    }

    fn rows(&self) -> Vec<Row> {
        let idle = humane(self.idle);
        let tick_ms = millis(self.tick);
        let kib = |s: &Spread| s.show_with(0, "KiB", &format!(" = {:.2} MiB", s.median / 1024.0));
        let cpu = |s: &Spread| {
            Spread {
                median: s.median * tick_ms,
                min: s.min * tick_ms,
                max: s.max * tick_ms,
            }
            .show(0, "ms")
        };
        let ms = |s: &Spread| s.show(1, "ms");
        vec![
            Row {
                label: "stripped executable (`--profile minsize`)".to_owned(),
                agent: bytes(self.sizes.agent),
                agent_mqtt: "(the same)".to_owned(),
                baseline: bytes(self.sizes.baseline),
                ratio: ratio(self.sizes.agent as f64, self.sizes.baseline as f64),
                goal: "< 4 MiB",
            },
            self.row(
                format!("resident memory after {idle} idle (VmRSS)"),
                "< 6 MiB",
                |a| a.idle.end.rss_kib as f64,
                |r| Some(r.baseline.end.rss_kib as f64),
                kib,
            ),
            self.row(
                "peak resident memory since exec (VmHWM)".to_owned(),
                "< 6 MiB",
                |a| a.idle.end.hwm_kib as f64,
                |r| Some(r.baseline.end.hwm_kib as f64),
                kib,
            ),
            self.row(
                format!("CPU time during the {idle} idle (utime+stime)"),
                "near zero",
                |a| a.idle.ticks as f64,
                |r| Some(r.baseline.ticks as f64),
                cpu,
            ),
            self.row(
                "CPU time from exec to the end of the idle".to_owned(),
                "",
                |a| a.idle.end.cpu_ticks as f64,
                |r| Some(r.baseline.end.cpu_ticks as f64),
                cpu,
            ),
            self.row(
                "exec to first signature (baseline: to the answer of its GET)".to_owned(),
                "milliseconds",
                |a| millis(a.start.first_signature),
                |r| Some(millis(r.baseline_answer)),
                ms,
            ),
            self.row(
                "exec to `active` (challenge, sign, POST, PATCH)".to_owned(),
                "",
                |a| millis(a.start.active),
                |_| None,
                ms,
            ),
        ]
    }

    pub(crate) fn markdown(&self) -> String {
        let mqtt = self.broker.is_some();
        let n = self.runs.len();
        let mut out = String::new();
        let _ = writeln!(out, "`{}` on {}.", self.command, self.machine);
        let _ = writeln!(
            out,
            "{n} run{s}, each against a fresh orchestrator (`--release`, SQLite, on 127.0.0.1, \
             once its `GET /ready` says 200): \
             the baseline, the agent with MQTT off{variant}, then {idle} idle for all of them. \
             Median of the runs (range when they differ). The kernel counts CPU time in \
             ticks of {tick} ms: 0 ms means less than one.\n",
            s = if n == 1 { "" } else { "s" },
            variant = self
                .broker
                .as_ref()
                .map(|b| format!(", the agent with MQTT on ({b})"))
                .unwrap_or_default(),
            idle = humane(self.idle),
            tick = thousands(millis(self.tick), 0),
        );
        let header: &[&str] = if mqtt {
            &[
                "",
                "peaqos-agent",
                "peaqos-agent, MQTT on",
                "baseline",
                "agent / baseline",
                "goal",
            ]
        } else {
            &["", "peaqos-agent", "baseline", "agent / baseline", "goal"]
        };
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
        for row in self.rows() {
            let mut cells = vec![row.label, row.agent];
            if mqtt {
                cells.push(row.agent_mqtt);
            }
            cells.extend([row.baseline, row.ratio, row.goal.to_owned()]);
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        let _ = writeln!(
            out,
            "\nPer run, exec to first signature / to `active` (ms):"
        );
        for (i, run) in self.runs.iter().enumerate() {
            let times = |a: &AgentRun| {
                format!(
                    "{:.1} / {:.1}",
                    millis(a.start.first_signature),
                    millis(a.start.active)
                )
            };
            let _ = write!(out, "{}. {}", i + 1, times(&run.agent));
            if let Some(m) = &run.agent_mqtt {
                let _ = write!(out, "; MQTT on: {}", times(m));
            }
            out.push('\n');
        }
        if !self.sizes.boards.is_empty() {
            out.push_str(
                "\nThe agent for the boards (stripped, `--profile minsize --target ...`, \
                 the same sources; `cargo xtask arm` runs them under qemu-user):\n\n\
                 | target | stripped executable | / x86-64 |\n|---|---:|---:|\n",
            );
            let _ = writeln!(
                out,
                "| x86_64-unknown-linux-gnu (above) | {} | 1.00 |",
                bytes(self.sizes.agent)
            );
            for (target, size) in &self.sizes.boards {
                let _ = match size {
                    Ok(size) => writeln!(
                        out,
                        "| {target} | {} | {} |",
                        bytes(*size),
                        ratio(*size as f64, self.sizes.agent as f64)
                    ),
                    Err(why) => writeln!(out, "| {target} | not built: {why} | |"),
                };
            }
        }
        out
    }
}

/// `60 s`, `2 min`, `1.5 s`, `500 ms`.
pub(crate) fn humane(d: Duration) -> String {
    if d.as_secs() >= 120 && d.as_secs().is_multiple_of(60) {
        format!("{} min", d.as_secs() / 60)
    } else if d >= Duration::from_secs(1) {
        let secs = d.as_secs_f64();
        if secs.fract() == 0.0 {
            format!("{secs:.0} s")
        } else {
            format!("{secs} s")
        }
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss: u64, hwm: u64, cpu: u64) -> Sample {
        Sample {
            cpu_ticks: cpu,
            rss_kib: rss,
            hwm_kib: hwm,
        }
    }

    fn run(sig_ms: u64, active_ms: u64, rss: u64, baseline_rss: u64) -> Run {
        let agent = AgentRun {
            start: StartTimes {
                first_signature: Duration::from_millis(sig_ms),
                active: Duration::from_millis(active_ms),
            },
            idle: Idle {
                end: sample(rss, rss + 100, 3),
                // 2, 2 and 0 ticks in the three runs of the table test.
                ticks: sig_ms % 3,
            },
        };
        Run {
            agent,
            agent_mqtt: None,
            baseline_answer: Duration::from_millis(sig_ms / 2),
            baseline: Idle {
                end: sample(baseline_rss, baseline_rss, 1),
                ticks: 0,
            },
        }
    }

    #[test]
    fn spreads_take_the_middle() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap();
        assert!((s.median - 2.5).abs() < f64::EPSILON);
        assert_eq!(Spread::of([]), None);
        assert_eq!(s.show(1, "ms"), "2.5 ms (1.0–4.0)");
        assert_eq!(Spread::of([5.0, 5.0]).unwrap().show(0, "KiB"), "5 KiB");
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(thousands(3_665_320.0, 0), "3,665,320");
        assert_eq!(thousands(999.0, 0), "999");
        assert_eq!(thousands(1000.0, 0), "1,000");
        assert_eq!(thousands(1234.56, 1), "1,234.6");
        assert_eq!(thousands(-1234.0, 0), "-1,234");
        assert_eq!(bytes(3_665_320), "3,665,320 B (3.50 MiB)");
        assert_eq!(humane(Duration::from_secs(60)), "60 s");
        assert_eq!(humane(Duration::from_secs(300)), "5 min");
        assert_eq!(humane(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(humane(Duration::from_millis(500)), "500 ms");
    }

    fn report(runs: Vec<Run>, broker: Option<&str>) -> Report {
        Report {
            command: "cargo xtask footprint --runs 3".into(),
            machine: "a test".into(),
            broker: broker.map(str::to_owned),
            idle: Duration::from_secs(60),
            tick: Duration::from_millis(10),
            sizes: Sizes {
                agent: 3_000_000,
                baseline: 2_000_000,
                boards: vec![
                    ("aarch64-unknown-linux-gnu", Ok(2_700_000)),
                    (
                        "armv7-unknown-linux-gnueabihf",
                        Err("no arm-linux-gnueabihf-gcc".into()),
                    ),
                ],
            },
            runs,
        }
    }

    fn line<'a>(text: &'a str, start: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?} in\n{text}"))
    }

    #[test]
    fn the_table_compares_medians_with_the_baseline() {
        let text = report(
            vec![
                run(8, 14, 5000, 3500),
                run(20, 30, 5100, 3400),
                run(9, 15, 4000, 3600),
            ],
            None,
        )
        .markdown();
        assert_eq!(
            line(&text, "|  | "),
            "|  | peaqos-agent | baseline | agent / baseline | goal |",
            "no MQTT column when MQTT did not run"
        );
        assert_eq!(
            line(&text, "| stripped"),
            "| stripped executable (`--profile minsize`) | 3,000,000 B (2.86 MiB) | \
             2,000,000 B (1.91 MiB) | 1.50 | < 4 MiB |"
        );
        // Medians 5000 and 3500: the ratio is of the medians.
        assert_eq!(
            line(&text, "| resident"),
            "| resident memory after 60 s idle (VmRSS) | 5,000 KiB = 4.88 MiB (4,000–5,100) | \
             3,500 KiB = 3.42 MiB (3,400–3,600) | 1.43 | < 6 MiB |"
        );
        assert_eq!(
            line(&text, "| exec to first"),
            "| exec to first signature (baseline: to the answer of its GET) | 9.0 ms (8.0–20.0) | \
             4.0 ms (4.0–10.0) | 2.25 | milliseconds |"
        );
        // Ticks of 10 ms; nothing to compare with a baseline that used none.
        assert_eq!(
            line(&text, "| CPU time during"),
            "| CPU time during the 60 s idle (utime+stime) | 20 ms (0–20) | 0 ms | – | near zero |"
        );
        assert_eq!(line(&text, "2. "), "2. 20.0 / 30.0");
        assert_eq!(
            line(&text, "| aarch64"),
            "| aarch64-unknown-linux-gnu | 2,700,000 B (2.57 MiB) | 0.90 |"
        );
        assert_eq!(
            line(&text, "| armv7"),
            "| armv7-unknown-linux-gnueabihf | not built: no arm-linux-gnueabihf-gcc | |"
        );
    }

    #[test]
    fn the_mqtt_variant_gets_a_column_and_a_ratio() {
        let mut runs = vec![run(8, 14, 5000, 4000)];
        runs[0].agent_mqtt = Some(AgentRun {
            start: StartTimes {
                first_signature: Duration::from_millis(10),
                active: Duration::from_millis(18),
            },
            idle: Idle {
                end: sample(6000, 6100, 4),
                ticks: 1,
            },
        });
        let text = report(runs, Some("a private Mosquitto")).markdown();
        assert!(
            text.contains("the agent with MQTT on (a private Mosquitto)"),
            "{text}"
        );
        assert_eq!(
            line(&text, "|  | "),
            "|  | peaqos-agent | peaqos-agent, MQTT on | baseline | agent / baseline | goal |"
        );
        assert_eq!(
            line(&text, "| resident"),
            "| resident memory after 60 s idle (VmRSS) | 5,000 KiB = 4.88 MiB | \
             6,000 KiB = 5.86 MiB | 4,000 KiB = 3.91 MiB | 1.25 (MQTT on: 1.50) | < 6 MiB |"
        );
        assert_eq!(
            line(&text, "| exec to `active`"),
            "| exec to `active` (challenge, sign, POST, PATCH) | 14.0 ms | 18.0 ms |  |  |  |"
        );
        assert_eq!(line(&text, "1. "), "1. 8.0 / 14.0; MQTT on: 10.0 / 18.0");
    }
}
