fn main() -> std::process::ExitCode {
    controlnet::cli::main()
}
