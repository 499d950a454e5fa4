//! Data formats shared by every process: tokenizers, the built-in addition corpus, the data plan, prepared
//! directories of token shards, and the corpus loader that turns a [`crate::spec::DataSpec`] into train/validation
//! token streams.

pub mod addition;
pub mod corpus;
pub mod dataset;
pub mod manifest;
pub mod plan;
pub mod prepare;
pub mod shard;
pub mod tokenizer;

pub use corpus::Corpus;
pub use plan::DataPlan;
pub use tokenizer::Tokenizer;
