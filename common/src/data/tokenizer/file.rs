//! `tokenizer.json`: Lockstep JSON (`{"kind": "char" | "byte" | "gpt2", ...}`) for the kinds that need no more than
//! a few fields, and the Hugging Face format itself for `hf:` and `bpe:` tokenizers. A Lockstep file has a `kind`
//! key; a Hugging Face one has a `model` key.
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::char_byte::{ByteTokenizer, CharTokenizer};
use super::gpt2::Gpt2Tokenizer;
use super::hf::HfTokenizer;
use super::{Kind, Tokenizer};
use crate::error::{Error, Result};

/// The Lockstep JSON forms. Files of earlier versions (`{"kind":"char","chars":"..."}`, `{"kind":"byte"}`) have
/// no `end_of_text` and load as tokenizers without one, as they were.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum LockstepJson {
    Char {
        chars: String,
        #[serde(default, skip_serializing_if = "is_false")]
        end_of_text: bool,
    },
    Byte {
        #[serde(default, skip_serializing_if = "is_false")]
        end_of_text: bool,
    },
    Gpt2,
}

fn is_false(b: &bool) -> bool {
    !b
}

pub(super) fn save(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    let json = match &tokenizer.kind {
        Kind::Char(t) => lockstep_json(&LockstepJson::Char {
            chars: t.chars().iter().collect(),
            end_of_text: t.eot().is_some(),
        })?,
        Kind::Byte(t) => lockstep_json(&LockstepJson::Byte { end_of_text: t.eot })?,
        Kind::Gpt2(_) => lockstep_json(&LockstepJson::Gpt2)?,
        Kind::Hf(t) => t.to_json()?,
    };
    std::fs::write(path, json).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn lockstep_json(value: &LockstepJson) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

pub(super) fn load(path: &Path) -> Result<Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |message: String| Error::Data {
        path: path.to_path_buf(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a tokenizer: not JSON ({e})")))?;
    let kind = if value.get("kind").is_some() {
        let json: LockstepJson =
            serde_json::from_value(value).map_err(|e| bad(format!("not a Lockstep tokenizer: {e}")))?;
        from_lockstep(json).map_err(bad)?
    } else if value.get("model").is_some() {
        Kind::Hf(HfTokenizer::from_json(&text, path)?)
    } else {
        return Err(bad(
            "not a tokenizer: neither Lockstep's ({\"kind\": ...}) nor a Hugging Face tokenizer.json ({\"model\": \
             ...}); give the tokenizer.json that `lockstep prepare` or a checkpoint wrote"
                .into(),
        ));
    };
    Ok(Tokenizer { kind })
}

fn from_lockstep(json: LockstepJson) -> std::result::Result<Kind, String> {
    Ok(match json {
        LockstepJson::Char { chars, end_of_text } => {
            let chars: Vec<char> = chars.chars().collect();
            // Ids are positions in the sorted list: an unsorted one would silently renumber them.
            if let Some(w) = chars.windows(2).find(|w| w[0] >= w[1]) {
                return Err(format!(
                    "\"chars\" must be sorted and distinct, but {:?} comes before {:?}; this file was not written \
                     by Lockstep",
                    w[0], w[1]
                ));
            }
            Kind::Char(CharTokenizer::new(chars, end_of_text))
        }
        LockstepJson::Byte { end_of_text } => Kind::Byte(ByteTokenizer { eot: end_of_text }),
        LockstepJson::Gpt2 => Kind::Gpt2(Gpt2Tokenizer),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::corpus;
    use super::super::{Tokenizer, TokenizerSpec};

    #[test]
    fn save_then_load_is_equal_for_every_kind() {
        let dir = tempfile::tempdir().unwrap();
        let bpe = Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: 300 }, corpus(100).into_iter()).unwrap();
        let hf_path = dir.path().join("hf.json");
        bpe.save(&hf_path).unwrap();
        let all = [
            Tokenizer::for_text(&TokenizerSpec::Char, "0123456789+=\n").unwrap(),
            Tokenizer::train(&TokenizerSpec::Char, ["héllo".to_string()].into_iter()).unwrap(),
            Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap(),
            Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty()).unwrap(),
            Tokenizer::for_text(&TokenizerSpec::Gpt2, "").unwrap(),
            Tokenizer::for_text(&TokenizerSpec::Hf(hf_path), "").unwrap(),
            bpe,
        ];
        for (i, tok) in all.iter().enumerate() {
            let path = dir.path().join(format!("{i}.json"));
            tok.save(&path).unwrap();
            let loaded = Tokenizer::load(&path).unwrap();
            assert_eq!(&loaded, tok, "{}", tok.describe());
            assert_eq!(loaded.eot(), tok.eot());
            assert_eq!(loaded.vocab_size(), tok.vocab_size());
        }
    }

    #[test]
    fn bpe_is_saved_in_the_hugging_face_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let bpe = Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: 300 }, corpus(100).into_iter()).unwrap();
        bpe.save(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["model"]["type"], "BPE");
        assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
        assert_eq!(json["pre_tokenizer"]["add_prefix_space"], false);
        assert_eq!(json["decoder"]["type"], "ByteLevel");
        assert_eq!(json["added_tokens"][0]["content"], "<|endoftext|>");
        assert_eq!(json["added_tokens"][0]["id"], 299);
        assert_eq!(json["added_tokens"][0]["special"], true);
        let direct = tokenizers::Tokenizer::from_file(&path).unwrap();
        assert_eq!(direct.get_vocab_size(true), 300);
    }

    #[test]
    fn files_of_earlier_versions_load_without_end_of_text() {
        let dir = tempfile::tempdir().unwrap();
        let char_path = dir.path().join("char.json");
        std::fs::write(
            &char_path,
            "{\n  \"kind\": \"char\",\n  \"chars\": \"\\n+0123456789=\"\n}",
        )
        .unwrap();
        let tok = Tokenizer::load(&char_path).unwrap();
        assert_eq!(
            tok,
            Tokenizer::for_text(&TokenizerSpec::Char, "0123456789+=\n").unwrap()
        );
        assert_eq!((tok.vocab_size(), tok.eot()), (13, None));
        let byte_path = dir.path().join("byte.json");
        std::fs::write(&byte_path, r#"{"kind":"byte"}"#).unwrap();
        let tok = Tokenizer::load(&byte_path).unwrap();
        assert_eq!((tok.vocab_size(), tok.eot()), (256, None));
        // And the new form of a tokenizer without end-of-text is the old form.
        let resaved = dir.path().join("resaved.json");
        tok.save(&resaved).unwrap();
        assert_eq!(
            std::fs::read_to_string(&resaved).unwrap().trim(),
            "{\n  \"kind\": \"byte\"\n}"
        );
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content, hint) in [
            ("garbage.json", "\u{1}\u{2} not json", "not JSON"),
            ("other.json", r#"{"vocab": 3}"#, "neither"),
            ("kind.json", r#"{"kind": "wordpiece"}"#, "not a Lockstep tokenizer"),
            ("extra.json", r#"{"kind": "byte", "lowercase": true}"#, "lowercase"),
            ("unsorted.json", r#"{"kind": "char", "chars": "ba"}"#, "sorted"),
            ("hf.json", r#"{"model": {"type": "Nope"}}"#, "Hugging Face"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let err = Tokenizer::load(&path).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(hint), "{name}: {err}");
        }
        let err = Tokenizer::load(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
