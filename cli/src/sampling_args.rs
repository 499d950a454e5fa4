//! The sampling flags shared by `lockstep generate`, `chat` and `eval` (--temperature, --top-k, --top-p): declared
//! once, flattened into each command, checked by [`SamplingArgs::config`].
//!
//! Each command keeps its own --temperature default (generate samples freely, chat a little more conservatively,
//! eval is greedy so its scores repeat). The default is a type parameter rather than a runtime value because clap
//! reads it while building the command, before any value exists, and must show it in `--help`.
use std::marker::PhantomData;

use lockstep_worker::sampling::SamplingConfig;

use crate::error::{Error, Result};

/// The defaults one command gives the sampling flags.
pub trait SamplingDefaults {
    /// --temperature when the flag is absent, as clap parses it and shows it in `--help` (`[default: ...]`). A
    /// string, not an f64: clap's `default_value_t` formats into a `static`, which cannot depend on a type parameter.
    const TEMPERATURE: &'static str;
}

#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs<D: SamplingDefaults> {
    /// Divides the logits before sampling: < 1 is more conservative, > 1 more varied; 0 = greedy (argmax).
    #[arg(long, default_value = D::TEMPERATURE)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Nucleus sampling: only among the most likely tokens whose probabilities add up to P, in (0, 1].
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    #[arg(skip)]
    defaults: PhantomData<D>,
}

impl<D: SamplingDefaults> SamplingArgs<D> {
    /// The sampling settings, checked, with errors that name the flag.
    pub fn config(&self) -> Result<SamplingConfig> {
        let config = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        };
        // The sampler's own check: its messages start with the setting's name, which here is the flag's.
        match config.validate() {
            Ok(()) => Ok(config),
            Err(lockstep_worker::Error::Usage(message)) => Err(Error::Usage(format!("--{message}"))),
            Err(e) => Err(e.into()),
        }
    }
}

/// One command's arguments parsed and rendered as `lockstep` would, for the commands' tests of their flags.
#[cfg(test)]
pub(crate) mod test_cli {
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    #[command(name = "lockstep-test")]
    struct Wrapper<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }

    /// `flags` (without a program name) parsed as a command taking `A`.
    pub fn parse<A: clap::Args>(flags: &[&str]) -> Result<A, clap::Error> {
        let argv = std::iter::once("lockstep-test").chain(flags.iter().copied());
        Wrapper::<A>::try_parse_from(argv).map(|w| w.args)
    }

    /// The `--help` text of a command taking `A`.
    pub fn help<A: clap::Args>() -> String {
        Wrapper::<A>::command().render_long_help().to_string()
    }

    /// The lines of `help` from the one naming `flag` up to the next flag.
    pub fn help_of(help: &str, flag: &str) -> String {
        let lines: Vec<&str> = help.lines().collect();
        let Some(start) = lines.iter().position(|l| l.trim_start().starts_with(flag)) else {
            return String::new();
        };
        let end = lines[start + 1..]
            .iter()
            .position(|l| l.trim_start().starts_with('-'))
            .map_or(lines.len(), |n| start + 1 + n);
        lines[start..end].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    struct Half;

    impl SamplingDefaults for Half {
        const TEMPERATURE: &'static str = "0.5";
    }

    fn args(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> SamplingArgs<Half> {
        SamplingArgs {
            temperature,
            top_k,
            top_p,
            defaults: PhantomData,
        }
    }

    #[test]
    fn flags_are_checked_by_name() {
        assert!(args(0.0, Some(3), Some(1.0)).config().unwrap().is_greedy());
        for (a, flag) in [
            (args(-0.5, None, None), "--temperature"),
            (args(f64::NAN, None, None), "--temperature"),
            (args(f64::INFINITY, None, None), "--temperature"),
            (args(1.0, Some(0), None), "--top-k"),
            (args(1.0, None, Some(0.0)), "--top-p"),
            (args(1.0, None, Some(1.01)), "--top-p"),
        ] {
            let err = a.config().unwrap_err().to_string();
            assert!(err.starts_with(flag), "{err}");
        }
    }

    #[test]
    fn parsed_flags_become_the_config() {
        let parse = test_cli::parse::<SamplingArgs<Half>>;
        let a = parse(&[]).unwrap();
        assert_eq!((a.temperature, a.top_k, a.top_p), (0.5, None, None));
        let c = parse(&["--temperature", "1.5", "--top-k", "40", "--top-p", "0.9"])
            .unwrap()
            .config()
            .unwrap();
        assert_eq!((c.temperature, c.top_k, c.top_p), (1.5, Some(40), Some(0.9)));
        assert!(parse(&["--temperature", "warm"]).is_err());
        let help = test_cli::help::<SamplingArgs<Half>>();
        let temperature = test_cli::help_of(&help, "--temperature");
        assert!(
            temperature.contains("0 = greedy") && temperature.contains("[default: 0.5]"),
            "{help}"
        );
    }
}
