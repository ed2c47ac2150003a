//! Writing to stdout and stderr without panicking when either is closed (`qnode list | head -1`,
//! `2>&-`): the `println!` family panics on a failed write; these macros drop the text instead,
//! so the command still finishes its work and decides its exit code as usual. Errors are rendered
//! on one line by [`error_line`], for `main` and the shell alike.

use std::io::Write;

/// Writes to stdout; a closed or broken stdout is ignored.
pub fn out(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.flush());
}

/// Writes to stderr; a closed or broken stderr is ignored.
pub fn err(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// One JSON object on its own line on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    crate::outln!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// The error and its causes on one line, each cause once: a message that already ends with its
/// cause's text (as "reading x: Is a directory (os error 21)" does) does not repeat it.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// `println!` that never panics.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::app::term::out(format_args!("{}\n", format_args!($($t)*))) };
}

/// `eprintln!` that never panics.
#[macro_export]
macro_rules! errln {
    ($($t:tt)*) => { $crate::app::term::err(format_args!("{}\n", format_args!($($t)*))) };
}

/// `eprint!` that never panics.
#[macro_export]
macro_rules! errp {
    ($($t:tt)*) => { $crate::app::term::err(format_args!($($t)*)) };
}
