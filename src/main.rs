//! The `qnode` binary: logging, argument parsing, and one-line errors. All logic is in the library.

use std::process::ExitCode;

use clap::Parser;
use qnode::app::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    limit_heap_growth();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: clap's own output on stdout.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            qnode::errln!(
                "qnode: error: {} (see qnode --help)",
                one_line(&e.to_string())
            );
            return ExitCode::from(2);
        }
    };
    // `serve` (and `sync`, which serves) reports each request at the default level; client
    // commands only warnings.
    let default = match cli.command {
        Command::Serve(_) | Command::Sync(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Client commands run their async work on this one thread (hashing and disk writes still go
    // to the blocking pool): every wake-up across threads was a context switch (figures in
    // docs/performance.md). `serve` and `sync` answer many peers at once and keep a worker per
    // core.
    let runtime = match cli.command {
        Command::Serve(_) | Command::Sync(_) => tokio::runtime::Runtime::new(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            qnode::errln!("qnode: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(qnode::app::cli::run(cli));
    // Store work still running on the blocking pool (a read stuck on a hung file system, say)
    // must not keep the process alive once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            qnode::errln!("qnode: error: {}", qnode::app::term::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Folds a clap usage error into one line: its message without the "error:" prefix and usage block.
fn one_line(rendered: &str) -> String {
    let message = rendered.split("\n\nUsage:").next().unwrap_or(rendered);
    let message = message.trim().trim_start_matches("error:").trim();
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Keeps glibc from fragmenting memory across heap arenas, and from returning chunk buffers to the
/// kernel only to fault them in again.
///
/// Chunk buffers (1 MiB) are allocated and freed on different threads (async workers and the
/// blocking pool). With glibc's default of up to 8 arenas per core, freed buffers scatter over many
/// arenas and resident memory grows; with 2 arenas they are reused. Buffers below 8 MiB always
/// come from the arenas, which keep up to 64 MiB free, so glibc does not trim freed buffers off
/// the top of a heap only to fault them in again. Figures: docs/performance.md.
fn limit_heap_growth() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
