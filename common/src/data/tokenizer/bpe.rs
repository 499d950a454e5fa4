//! `bpe:N`: trains a GPT-2-style byte-level BPE on the corpus with Hugging Face `tokenizers`: the ByteLevel
//! pre-tokenizer (GPT-2's regex, no added prefix space) and decoder, all 256 byte symbols whether or not the corpus
//! uses them, merges up to N − 1 ids, and `<|endoftext|>` as id N − 1.
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfInner, Trainer};

use super::END_OF_TEXT;
use super::hf::{HfTokenizer, Origin};
use super::spec::BPE_VOCAB_RANGE;
use super::{chunks, pretokenize};
use crate::error::{Error, Result};

/// Trains on `texts`, streamed: memory holds the word counts, not the corpus (long documents are counted in
/// pieces). Deterministic: the same texts give the same tokenizer, whatever the thread count.
pub(super) fn train<I>(vocab_size: usize, texts: I) -> Result<HfTokenizer>
where
    I: Iterator<Item = String> + Send,
{
    if !BPE_VOCAB_RANGE.contains(&vocab_size) {
        return Err(Error::Tokenizer(format!(
            "bpe:{vocab_size}: a byte-level BPE vocabulary is between {} and {} ids",
            BPE_VOCAB_RANGE.start(),
            BPE_VOCAB_RANGE.end()
        )));
    }
    let mut trainer = BpeTrainer::builder()
        .show_progress(false)
        // End-of-text is added after training, so that its id is the last (as in GPT-2).
        .vocab_size(vocab_size - 1)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let pieces = texts.flat_map(|text| {
        if text.len() <= chunks::MAX_PIECE {
            vec![text]
        } else {
            chunks::pieces(&text, chunks::MAX_PIECE).map(str::to_string).collect()
        }
    });
    // The words ByteLevel's pre-tokenizer would give, found several times faster (a test checks that the result
    // equals `tokenizers::Tokenizer::train`'s).
    let failed = |e: tokenizers::Error| Error::Tokenizer(format!("bpe:{vocab_size}: training failed: {e}"));
    trainer
        .feed(pieces, |text| Ok(pretokenize::byte_level_words(text)))
        .map_err(failed)?;
    let mut model = BPE::default();
    trainer.train(&mut model).map_err(failed)?;
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = HfInner::new(model);
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .add_special_tokens([AddedToken::from(END_OF_TEXT, true)])
        .map_err(|e| Error::Tokenizer(format!("bpe:{vocab_size}: cannot add {END_OF_TEXT}: {e}")))?;
    let got = tokenizer.get_vocab_size(true);
    if got != vocab_size {
        return Err(Error::Tokenizer(format!(
            "bpe:{vocab_size}: the corpus has only enough distinct byte pairs for a vocabulary of {got} ids (256 \
             bytes, {} merges, end-of-text); use bpe:{got} or fewer, or more text",
            got.saturating_sub(257)
        )));
    }
    HfTokenizer::new(tokenizer, Origin::Trained)
}

#[cfg(test)]
mod tests {
    use super::super::tests::corpus;
    use super::super::{Tokenizer, TokenizerSpec};

    fn bpe(n: usize, docs: usize) -> Tokenizer {
        Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: n }, corpus(docs).into_iter()).unwrap()
    }

    #[test]
    fn trained_bpe_has_the_vocabulary_asked_for_and_round_trips_unseen_text() {
        let tok = bpe(300, 200);
        assert_eq!(tok.vocab_size(), 300);
        assert_eq!(tok.eot(), Some(299));
        assert_eq!(tok.decode(&[299]), "<|endoftext|>");
        for text in [
            "naïve ☃",
            "unseen words: zebra, 😀, ∑ and Ωmega\r\n\ttab",
            "",
            " leading space",
        ] {
            let ids = tok.encode(text).unwrap();
            assert!(ids.iter().all(|&id| id < 299), "{text}: {ids:?}");
            assert_eq!(tok.decode(&ids), text);
        }
        // Merges were learned: frequent words take fewer ids than bytes.
        assert!(tok.encode(" the quick brown fox").unwrap().len() < 10);
    }

    #[test]
    fn training_is_deterministic() {
        let first = bpe(400, 300);
        for _ in 0..3 {
            assert_eq!(bpe(400, 300), first);
        }
        assert_ne!(bpe(401, 300), first);
    }

    #[test]
    fn too_small_a_corpus_for_the_vocabulary_is_an_error() {
        let texts = ["ab ab ab".to_string()];
        let err = Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: 1000 }, texts.into_iter())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bpe:1000") && err.contains("more text"), "{err}");
    }

    #[test]
    fn training_equals_that_of_tokenizers() {
        use tokenizers::models::TrainerWrapper;
        use tokenizers::models::bpe::{BPE, BpeTrainer};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::{AddedToken, Tokenizer as HfInner};
        let docs = corpus(300);
        let ours = bpe(500, 300);
        let byte_level = ByteLevel::new(false, true, true);
        let mut theirs = HfInner::new(BPE::default());
        theirs
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level));
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .show_progress(false)
            .vocab_size(499)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        theirs.train(&mut trainer, docs.into_iter()).unwrap();
        theirs
            .add_special_tokens([AddedToken::from("<|endoftext|>", true)])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("theirs.json");
        theirs.save(&path, false).unwrap();
        assert_eq!(Tokenizer::load(&path).unwrap(), ours);
    }
}
