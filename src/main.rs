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

    // Client commands run their async work on this one thread (hashing and disk writes still go
    // to the blocking pool): every wake-up across threads was a context switch. Measured (cargo
    // bench, QNODE_BENCH_BIN A/B): 1 GiB loopback 714-755 -> 796 MB/s, 1.4 -> 1.3 CPU·s/GiB;
    // one 200 Mbit/s source 5.1 -> 3.3 CPU·s/GiB, eight 3.7 -> 3.0, at the same throughput.
    // `serve` answers many peers at once and keeps a worker per core.
    let runtime = match cli.command {
        Command::Serve(_) => tokio::runtime::Runtime::new(),
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
/// arenas and resident memory grows; with 2 arenas they are reused. Measured on a 1 GiB loopback
/// transfer (cargo bench): default glibc: server 80 MB peak RSS; a fixed mmap threshold instead
/// (every buffer a fresh mapping): 26 MB but 11% of server CPU in page faults; 2 arenas: 34 MB,
/// server CPU -10% and downloader sys time -40% against the fixed threshold.
/// glibc still trimmed freed buffers off the top of a heap and faulted them in again (40-100k page
/// faults per GiB downloaded). Buffers below 8 MiB now always come from the arenas, which keep up
/// to 64 MiB of free memory: 12k faults per GiB, loopback 1 GiB 605 -> 660 MiB/s, downloader CPU
/// -6%, server peak RSS 34 -> 43 MB (interleaved runs, `perf stat`).
fn limit_heap_growth() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
