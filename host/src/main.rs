//! The `staircase` binary: parses arguments and calls the library.

fn main() -> std::process::ExitCode {
    staircase::cli::main()
}
