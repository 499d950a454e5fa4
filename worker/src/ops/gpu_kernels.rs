//! `LOCKSTEP_GPU_COMPOSED`: which of the fused GPU kernels stand down, so that their ops take candle's composed
//! versions on a GPU too. Unset, every fused kernel runs. `all`, or a comma-separated list of kernel names, turns
//! those off without a rebuild: the way out when a kernel is in doubt on some GPU (a wrong result, a failed launch),
//! and the way to measure a step without one (the "before" of a speed figure, a profile's part). The CPU's fused
//! kernels do not consult it; they are tested against the composed versions on every `cargo test`.
//!
//! The variable is read once per process. A worker or `lockstep bench` that opens a GPU checks it first
//! ([`check`]), so a misspelt name is a one-line error at start, not at the first op.
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The environment variable.
pub const VAR: &str = "LOCKSTEP_GPU_COMPOSED";

/// A fused GPU kernel (or family of kernels) that [`VAR`] can turn off.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernel {
    /// Causal attention, packed and split (`ops::causal_self_attention`, `ops::causal_attention`); off, attention
    /// is the composed matmul-softmax-matmul and its B·H·T² probabilities are stored.
    Attention,
    LayerNorm,
    Gelu,
    BiasAdd,
    /// c_fc's bias and GELU as one op; off, [`Kernel::BiasAdd`] then [`Kernel::Gelu`] (each fused unless off).
    BiasGelu,
    CrossEntropy,
    Embedding,
    /// The head split and merge (decoding and attention dropout; training without dropout uses none).
    Heads,
    /// The multi-tensor AdamW with clipping over the flat parameter buffer; off, the composed per-tensor optimizer.
    AdamW,
}

impl Kernel {
    pub const ALL: [Kernel; 9] = [
        Kernel::Attention,
        Kernel::LayerNorm,
        Kernel::Gelu,
        Kernel::BiasAdd,
        Kernel::BiasGelu,
        Kernel::CrossEntropy,
        Kernel::Embedding,
        Kernel::Heads,
        Kernel::AdamW,
    ];

    /// The name [`VAR`] uses.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Attention => "attention",
            Kernel::LayerNorm => "layer_norm",
            Kernel::Gelu => "gelu",
            Kernel::BiasAdd => "bias_add",
            Kernel::BiasGelu => "bias_gelu",
            Kernel::CrossEntropy => "cross_entropy",
            Kernel::Embedding => "embedding",
            Kernel::Heads => "heads",
            Kernel::AdamW => "adamw",
        }
    }
}

/// The kernels a value of [`VAR`] turns off: none for an empty value, every one for `all`, else the listed names
/// (commas, spaces around them allowed). An unknown name is an error naming it and the names there are.
fn parse(value: &str) -> std::result::Result<Vec<Kernel>, String> {
    if value.trim() == "all" {
        return Ok(Kernel::ALL.to_vec());
    }
    let mut off = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kernel = Kernel::ALL.iter().copied().find(|k| k.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
            format!(
                "{VAR}={value}: no fused GPU kernel `{name}`; name some of {} (comma-separated), or `all`",
                names.join(", ")
            )
        })?;
        if !off.contains(&kernel) {
            off.push(kernel);
        }
    }
    Ok(off)
}

/// The kernels [`VAR`] turns off in this process.
pub fn turned_off() -> Result<&'static [Kernel]> {
    static OFF: OnceLock<std::result::Result<Vec<Kernel>, String>> = OnceLock::new();
    let off = OFF.get_or_init(|| match std::env::var(VAR) {
        Ok(value) => parse(&value),
        Err(std::env::VarError::NotPresent) => Ok(Vec::new()),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{VAR}: not UTF-8; name kernels, or `all`")),
    });
    match off {
        Ok(off) => Ok(off),
        Err(message) => Err(Error::Usage(message.clone())),
    }
}

/// Whether `kernel` may run (a GPU op asks before it takes its fused path).
pub fn enabled(kernel: Kernel) -> Result<bool> {
    Ok(!turned_off()?.contains(&kernel))
}

/// Checks [`VAR`] and says in a few words which fused GPU kernels run: `all`, `all but attention, gelu`, `none`.
pub fn check() -> Result<String> {
    Ok(describe(turned_off()?))
}

fn describe(off: &[Kernel]) -> String {
    let names = |ks: &[Kernel]| ks.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
    match off.len() {
        0 => "all".into(),
        n if n == Kernel::ALL.len() => format!("none ({VAR})"),
        _ => {
            // In the canonical order, whatever the order given.
            let off: Vec<Kernel> = Kernel::ALL.into_iter().filter(|k| off.contains(k)).collect();
            format!("all but {} ({VAR})", names(&off))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lists_and_all_parse() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse(" , ").unwrap(), vec![]);
        assert_eq!(parse("all").unwrap(), Kernel::ALL.to_vec());
        assert_eq!(
            parse("gelu, attention,gelu").unwrap(),
            vec![Kernel::Gelu, Kernel::Attention]
        );
        for k in Kernel::ALL {
            assert_eq!(parse(k.name()).unwrap(), vec![k]);
        }
    }

    #[test]
    fn an_unknown_name_is_refused_naming_it_and_the_known_ones() {
        let e = parse("layer_norm,layernorm").unwrap_err();
        assert!(
            e.starts_with("LOCKSTEP_GPU_COMPOSED=layer_norm,layernorm: no fused GPU kernel `layernorm`"),
            "{e}"
        );
        for k in Kernel::ALL {
            assert!(e.contains(k.name()), "{e}");
        }
        // `all` only alone: inside a list it is a misspelling like any other.
        assert!(parse("all,gelu").is_err());
    }

    #[test]
    fn the_description_names_what_is_off_in_canonical_order() {
        assert_eq!(describe(&[]), "all");
        assert_eq!(describe(&Kernel::ALL), "none (LOCKSTEP_GPU_COMPOSED)");
        assert_eq!(
            describe(&[Kernel::AdamW, Kernel::Attention]),
            "all but attention, adamw (LOCKSTEP_GPU_COMPOSED)"
        );
    }
}
