//! `hyperboot`: boots a sealed `.hvm` artifact (see the library's `cli`).
//! Exit codes: the app's own, or hyperboot's (`hyperboot::exit`).

fn main() -> std::process::ExitCode {
    hyperboot::cli::main()
}
