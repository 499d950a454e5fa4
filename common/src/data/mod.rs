//! Data formats shared by every process: tokenizers, the built-in addition corpus, the data plan, prepared
//! directories of token shards, the chat template and fine-tuning examples, and the corpus loader that turns a
//! [`crate::spec::DataSpec`] into train/validation token streams.

pub mod addition;
pub mod chat;
pub mod corpus;
pub mod dataset;
pub mod manifest;
pub mod plan;
pub mod prepare;
pub mod sft;
pub mod shard;
pub mod tokenizer;

pub use corpus::Corpus;
pub use plan::DataPlan;
pub use tokenizer::Tokenizer;

/// A target id that is not a token: the position is not counted in the loss (fine-tuning masks everything but the
/// assistant's words with it). The loss is divided by the counted targets of the global batch (DESIGN §3).
pub const IGNORE: u32 = u32::MAX;
