//! `nccl-perf`: nccl-tests compatible benchmark (see `nccl_stack::perf`). Usage: `nccl-perf <op> [flags]`.

fn main() {
    nccl_stack::init_logging();
    std::process::exit(nccl_stack::perf::run::main_with(std::env::args().collect()));
}
