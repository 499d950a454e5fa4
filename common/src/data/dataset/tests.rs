use std::path::{Path, PathBuf};

use super::*;
use crate::RunSpec;
use crate::data::Corpus;
use crate::data::corpus::Split;
use crate::data::manifest::TOKENIZER_FILE;
use crate::data::shard::{HEADER_BYTES, TokenWidth, write_shard};
use crate::spec::DataSource;

/// `byte` with end-of-text: 257 ids, as `lockstep prepare --tokenizer byte` builds it.
fn byte_tokenizer() -> Tokenizer {
    Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty::<String>()).unwrap()
}

/// `n` consecutive ids from `from`, wrapping below 250 (inside the byte vocabulary).
fn ids(from: u32, n: u32) -> Vec<u32> {
    (from..from + n).map(|i| i % 250).collect()
}

/// A prepared directory: train shards of 100, 50 and 3 tokens, val shards of 40 and 30.
fn prepared(dir: &Path) -> Manifest {
    let train = [ids(0, 100), ids(100, 50), ids(150, 3)];
    let val = [ids(1000, 40), ids(1040, 30)];
    write_prepared(dir, &byte_tokenizer(), &TokenizerSpec::Byte, &train, &val).unwrap()
}

fn spec(dir: &Path, seq_len: usize) -> RunSpec {
    let mut spec = RunSpec::default();
    spec.data.source = DataSource::Prepared;
    spec.data.path = Some(dir.to_path_buf());
    spec.train.seq_len = seq_len;
    spec.validate().unwrap();
    spec
}

fn open_err(dir: &Path, tokenizer: Option<&TokenizerSpec>, verify: DataVerify) -> String {
    Dataset::open(dir, tokenizer, verify).unwrap_err().to_string()
}

#[test]
fn windows_run_over_shards_in_order_and_never_span_two() {
    let dir = tempfile::tempdir().unwrap();
    prepared(dir.path());
    let corpus = Corpus::load_checked(&spec(dir.path(), 8), DataVerify::Full).unwrap();
    assert_eq!(corpus.layout, Some(Layout::Prepared));
    assert_eq!(corpus.tokenizer.vocab_size(), 257);
    // (100 − 1) / 8 = 12, (50 − 1) / 8 = 6, (3 − 1) / 8 = 0.
    assert_eq!(corpus.num_windows(Split::Train), 18);
    assert_eq!(corpus.num_windows(Split::Val), 4 + 3);
    assert_eq!(corpus.train.tokens(), 153);
    // The last window of the first shard, then the first of the second.
    assert_eq!(corpus.window(Split::Train, 11).unwrap(), (ids(88, 8), ids(89, 8)));
    assert_eq!(corpus.window(Split::Train, 12).unwrap(), (ids(100, 8), ids(101, 8)));
    assert_eq!(corpus.window(Split::Train, 17).unwrap(), (ids(140, 8), ids(141, 8)));
    assert!(corpus.window(Split::Train, 18).is_err());
    assert_eq!(corpus.window(Split::Val, 4).unwrap().0, ids(1040, 8));
}

#[test]
fn a_missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    prepared(dir.path());
    std::fs::remove_file(dir.path().join("train_000001.bin")).unwrap();
    let err = open_err(dir.path(), None, DataVerify::Sizes);
    assert!(
        err.contains("train_000001.bin") && err.contains("missing") && err.contains("lockstep prepare"),
        "{err}"
    );
}

#[test]
fn a_size_that_disagrees_with_the_header_is_named() {
    let dir = tempfile::tempdir().unwrap();
    prepared(dir.path());
    let path = dir.path().join("val_000001.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend([0, 0, 0]);
    std::fs::write(&path, bytes).unwrap();
    let err = open_err(dir.path(), None, DataVerify::Sizes);
    assert!(err.contains("val_000001.bin") && err.contains("too long"), "{err}");
}

#[test]
fn a_header_count_that_disagrees_with_the_manifest_is_named() {
    let dir = tempfile::tempdir().unwrap();
    prepared(dir.path());
    write_shard(&dir.path().join("train_000000.bin"), &ids(0, 90), TokenWidth::U16).unwrap();
    let err = open_err(dir.path(), None, DataVerify::Sizes);
    assert!(
        err.contains("train_000000.bin") && err.contains("header says 90 tokens but manifest.json says 100"),
        "{err}"
    );
}

#[test]
fn a_checksum_mismatch_is_found_by_the_full_check_only() {
    let dir = tempfile::tempdir().unwrap();
    prepared(dir.path());
    let path = dir.path().join("train_000001.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[HEADER_BYTES + 10] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    Dataset::open(dir.path(), None, DataVerify::Sizes).unwrap();
    let err = open_err(dir.path(), None, DataVerify::Full);
    assert!(
        err.contains("train_000001.bin") && err.contains("checksum mismatch") && err.contains("lockstep prepare"),
        "{err}"
    );
}

#[test]
fn a_token_outside_the_vocabulary_is_named_with_its_byte_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = ids(0, 60);
    bad[37] = 300;
    write_prepared(
        dir.path(),
        &byte_tokenizer(),
        &TokenizerSpec::Byte,
        &[ids(0, 50), bad],
        &[ids(0, 50)],
    )
    .unwrap();
    Dataset::open(dir.path(), None, DataVerify::Sizes).unwrap();
    let err = open_err(dir.path(), None, DataVerify::Full);
    let offset = HEADER_BYTES + 37 * 2;
    assert!(err.contains("train_000001.bin"), "{err}");
    assert!(
        err.contains(&format!("token id 300 at byte offset {offset}")) && err.contains("vocabulary of 257"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_that_is_not_the_manifests_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    prepared(dir.path());
    // data.tokenizer naming another tokenizer.
    let err = open_err(dir.path(), Some(&TokenizerSpec::Gpt2), DataVerify::Sizes);
    assert!(
        err.contains("data.tokenizer") && err.contains("gpt2") && err.contains("prepared with the byte tokenizer"),
        "{err}"
    );
    Dataset::open(dir.path(), Some(&TokenizerSpec::Byte), DataVerify::Sizes).unwrap();
    // A tokenizer file whose hash is not the manifest's.
    let path = dir.path().join(TOKENIZER_FILE);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    let err = open_err(dir.path(), None, DataVerify::Sizes);
    assert!(err.contains("tokenizer.json") && err.contains("SHA-256"), "{err}");
}

#[test]
fn a_manifest_cannot_point_outside_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = prepared(dir.path());
    m.train.shards[0].file = "../elsewhere.bin".into();
    m.save(dir.path()).unwrap();
    let err = open_err(dir.path(), None, DataVerify::Sizes);
    assert!(
        err.contains("manifest.json") && err.contains("../elsewhere.bin"),
        "{err}"
    );
}

#[test]
fn a_split_without_windows_says_why() {
    let dir = tempfile::tempdir().unwrap();
    write_prepared(dir.path(), &byte_tokenizer(), &TokenizerSpec::Byte, &[ids(0, 100)], &[]).unwrap();
    let err = Corpus::load(&spec(dir.path(), 8)).unwrap_err().to_string();
    assert!(
        err.contains("validation split") && err.contains("--val-fraction"),
        "{err}"
    );
}

/// A shard exactly as llm.c's `fineweb.py` writes one, built from the format's description: 256 little-endian
/// `i32` (magic 20240520, version 1, token count, zeros), then the tokens as little-endian `u16`.
fn llmc_shard(path: &Path, tokens: &[u16]) {
    let mut bytes = Vec::new();
    let mut header = [0i32; 256];
    header[0] = 20240520;
    header[1] = 1;
    header[2] = tokens.len() as i32;
    for v in header {
        bytes.extend(v.to_le_bytes());
    }
    for t in tokens {
        bytes.extend(t.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn llmc_dir(dir: &Path) -> PathBuf {
    let u16s = |from: u16, n: u16| (from..from + n).map(|i| i % 256).collect::<Vec<u16>>();
    llmc_shard(&dir.join("fineweb_val_000000.bin"), &u16s(500, 33));
    llmc_shard(&dir.join("fineweb_train_000002.bin"), &u16s(200, 41));
    llmc_shard(&dir.join("fineweb_train_000001.bin"), &u16s(0, 41));
    std::fs::write(dir.join("README.txt"), "not a shard").unwrap();
    dir.to_path_buf()
}

#[test]
fn llmc_shards_are_read_as_is_with_the_named_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    llmc_dir(dir.path());
    let mut spec = spec(dir.path(), 8);
    let err = Corpus::load(&spec).unwrap_err().to_string();
    assert!(
        err.contains("data.tokenizer") && err.contains("no manifest.json") && err.contains("llm.c"),
        "{err}"
    );
    spec.data.tokenizer = Some(TokenizerSpec::Byte);
    let corpus = Corpus::load_checked(&spec, DataVerify::Full).unwrap();
    assert_eq!(corpus.layout, Some(Layout::LlmC));
    assert_eq!(corpus.tokenizer.vocab_size(), 256);
    // Training shards in name order (000001 before 000002), 5 windows each; validation 4.
    assert_eq!(corpus.num_windows(Split::Train), 10);
    assert_eq!(corpus.num_windows(Split::Val), 4);
    let first: Vec<u32> = (0..8).collect();
    assert_eq!(corpus.window(Split::Train, 0).unwrap().0, first);
    let sixth: Vec<u32> = (200..208).map(|i| i % 256).collect();
    assert_eq!(corpus.window(Split::Train, 5).unwrap().0, sixth);

    // An id outside the named tokenizer's vocabulary, found by the full check with its offset.
    let mut tokens: Vec<u16> = (0..41).collect();
    tokens[20] = 50_000;
    llmc_shard(&dir.path().join("fineweb_train_000002.bin"), &tokens);
    Corpus::load(&spec).unwrap();
    let err = Corpus::load_checked(&spec, DataVerify::Full).unwrap_err().to_string();
    assert!(
        err.contains("fineweb_train_000002.bin") && err.contains("token id 50000 at byte offset 1064"),
        "{err}"
    );
}

#[test]
fn a_directory_without_shards_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_err(dir.path(), Some(&TokenizerSpec::Gpt2), DataVerify::Sizes);
    assert!(err.contains("no *train*.bin shards"), "{err}");
    let err = open_err(&dir.path().join("absent"), None, DataVerify::Sizes);
    assert!(err.contains("absent") && err.contains("not a directory"), "{err}");
}

#[test]
fn data_verify_is_read_from_toml_and_left_out_of_the_training_hash() {
    let spec = RunSpec::from_toml_str("[data]\nverify = \"sizes\"\n").unwrap();
    assert_eq!(spec.data.verify, DataVerify::Sizes);
    assert_eq!(RunSpec::default().data.verify, DataVerify::Full);
    assert_eq!(spec.training_hash(), RunSpec::default().training_hash());
    assert!(spec.training_diff(&RunSpec::default()).is_empty());
    let err = RunSpec::from_toml_str("[data]\nverify = \"most\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("most"), "{err}");
}
