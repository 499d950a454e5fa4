//! lockstep-cli: the `lockstep` command — the user's single entry point. `run` launches a local coordinator and
//! workers and shows progress; `status` and `history` ask a coordinator; `bench` measures. It owns no training logic of its own:
//! it starts the daemons, talks gRPC to them, and loads checkpoints through lockstep-worker for evaluation.

pub mod bench;
pub mod bench_coordinator;
pub mod bench_profile;
pub mod bench_score;
pub mod chat;
pub mod demo;
pub mod error;
pub mod eval;
pub mod generate;
pub mod history;
pub mod prepare;
pub mod procs;
pub mod run;
pub mod sampling_args;
pub mod score;
pub mod sft_demo;
pub mod status_view;

pub use error::Error;
