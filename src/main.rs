//! The `qnode` binary: logging, argument parsing, and one-line errors. All logic is in the library.

use std::process::ExitCode;

use clap::Parser;
use qnode::cli::{Cli, Command};
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
            eprintln!(
                "qnode: error: {} (see qnode --help)",
                one_line(&e.to_string())
            );
            return ExitCode::from(2);
        }
    };
    // `serve` reports each request at the default level; client commands only warnings.
    let default = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qnode: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(qnode::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qnode: error: {e:#}");
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

/// Keeps chunk-sized buffers (≥ 256 KiB) out of glibc's heap arenas.
///
/// glibc raises its mmap threshold each time a large mmapped block is freed, after which 1 MiB
/// chunk buffers come from per-thread arenas (one per blocking-pool thread) and fragment them:
/// measured on a 1 GiB transfer, the server's peak RSS went from 64 MB to 26 MB (downloader 50 to 45 MB) with
/// a fixed threshold, at no measurable cost in throughput.
fn limit_heap_growth() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
