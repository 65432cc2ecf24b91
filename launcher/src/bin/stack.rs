//! The `stack` binary that `scripts/stack.sh` builds and runs (see `launcher::stack`).

fn main() -> std::process::ExitCode {
    launcher::stack::main()
}
