fn main() -> std::process::ExitCode {
    meshbroker::cli::main()
}
