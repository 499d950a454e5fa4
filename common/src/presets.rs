//! Named model shapes for `[model] preset = "..."`.
//!
//! A preset fills in the decoder's shape (`n_layer`, `n_head`, `n_embd`, `block_size`, `vocab_size`); any of those
//! keys written in the run spec file or the environment overrides the preset's value (see [`crate::spec`]).
//! `custom`, the default, is no preset: the shape is the spec's keys and their defaults (the `tiny` shape).

/// A named decoder shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// GPT-2's `n_positions`.
    pub block_size: usize,
    /// 0 = the tokenizer's.
    pub vocab_size: usize,
    /// One line for error messages and docs.
    pub about: &'static str,
}

/// The preset name meaning "no preset".
pub const CUSTOM: &str = "custom";

/// Every preset, smallest first. The GPT-2 shapes are those of OpenAI's released checkpoints (Hugging Face
/// `openai-community/gpt2`, `-medium`, `-large`, `-xl`).
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        block_size: 64,
        vocab_size: 0,
        about: "the built-in demo's shape, for tests and demos",
    },
    Preset {
        name: "nanogpt-cpu",
        n_layer: 4,
        n_head: 4,
        n_embd: 128,
        block_size: 64,
        vocab_size: 0,
        about: "nanoGPT's CPU Shakespeare-char shape",
    },
    Preset {
        name: "shakespeare-char",
        n_layer: 6,
        n_head: 6,
        n_embd: 384,
        block_size: 256,
        vocab_size: 0,
        about: "nanoGPT's GPU Shakespeare-char shape (10.7M parameters with 65 characters)",
    },
    Preset {
        name: "gpt2",
        n_layer: 12,
        n_head: 12,
        n_embd: 768,
        block_size: 1024,
        vocab_size: 50257,
        about: "GPT-2 small, 124M parameters",
    },
    Preset {
        name: "gpt2-medium",
        n_layer: 24,
        n_head: 16,
        n_embd: 1024,
        block_size: 1024,
        vocab_size: 50257,
        about: "GPT-2 medium, 350M parameters",
    },
    Preset {
        name: "gpt2-large",
        n_layer: 36,
        n_head: 20,
        n_embd: 1280,
        block_size: 1024,
        vocab_size: 50257,
        about: "GPT-2 large, 774M parameters",
    },
    Preset {
        name: "gpt2-xl",
        n_layer: 48,
        n_head: 25,
        n_embd: 1600,
        block_size: 1024,
        vocab_size: 50257,
        about: "GPT-2 XL, 1558M parameters",
    },
];

/// The preset called `name`; `None` for `custom` and for unknown names (see [`is_known`]).
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// Whether `name` is `custom` or a preset.
pub fn is_known(name: &str) -> bool {
    name == CUSTOM || find(name).is_some()
}

/// Every accepted name, `custom` first, comma-separated: for error messages.
pub fn known_names() -> String {
    std::iter::once(CUSTOM)
        .chain(PRESETS.iter().map(|p| p.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_shapes_valid() {
        let mut names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PRESETS.len());
        assert!(find(CUSTOM).is_none() && is_known(CUSTOM));
        for p in PRESETS {
            assert!(
                p.n_layer > 0 && p.n_head > 0 && p.n_embd.is_multiple_of(p.n_head),
                "{p:?}"
            );
        }
    }

    #[test]
    fn gpt2_small_has_124m_parameters() {
        let p = find("gpt2").unwrap();
        let (c, v, t, l) = (p.n_embd, p.vocab_size, p.block_size, p.n_layer);
        // wte + wpe + per block (2 LayerNorms, c_attn, attn c_proj, c_fc, mlp c_proj) + ln_f.
        let block = 4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c);
        let total = v * c + t * c + l * block + 2 * c;
        assert_eq!(total, 124_439_808);
    }
}
