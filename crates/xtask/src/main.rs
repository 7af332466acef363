//! `cargo xtask <task>`: project tasks that need more than one cargo call.

use std::process::ExitCode;

mod test;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let result = if let Some("test") = task.as_deref() {
        test::run(&rest)
    } else {
        {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 test [ARGS]   run the whole test suite (cargo test --workspace ARGS), saying\n                \
                 which real servers it used; PEAQOS_TEST_REQUIRE=mosquitto,postgres,python\n                \
                 makes a missing one a failure"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
