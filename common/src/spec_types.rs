//! The types of a run spec file's values, checked before the `config` crate reads them: it coerces freely
//! (`total_steps = true` becomes 1, `"100"` becomes 100, `100.7` becomes 101), which turns a mistake into a silently
//! different run. A value must have its field's type: a whole number for a count, a number for a rate, `true` or
//! `false` for a switch, a string for a name or path. The environment's overrides are text by nature and keep the
//! crate's parsing.
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::spec::RunSpec;

/// Checks every value of the TOML `text` (read from `shown`) against the type of its field in [`RunSpec`]. Keys the
/// spec does not have are left to the spec's own check, which names them.
pub fn check(shown: &str, text: &str) -> Result<()> {
    let file: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Config {
        path: shown.to_string(),
        message: e.to_string(),
    })?;
    let defaults = serde_json::to_value(RunSpec::default()).map_err(|e| Error::Config {
        path: shown.to_string(),
        message: format!("cannot describe the spec's fields: {e}"),
    })?;
    for (section, table) in &file {
        let (Some(table), Some(fields)) = (table.as_table(), defaults.get(section)) else {
            continue;
        };
        for (key, value) in table {
            if let Some(expected) = fields.get(key).and_then(|d| mismatch(d, value)) {
                return Err(Error::Config {
                    path: shown.to_string(),
                    message: format!("{section}.{key} = {value}: expected {expected}"),
                });
            }
        }
    }
    Ok(())
}

/// The first of `vars` (environment variable names with the spec's prefix) that looks like a spec override written
/// with one underscore after its section (`LOCKSTEP_TRAIN_TOTAL_STEPS`), which would otherwise be taken for no
/// override at all; the message gives the spelling that works. The binaries' own variables name no section.
pub fn misspelt_override<'a>(vars: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let sections: Vec<String> = match serde_json::to_value(RunSpec::default()) {
        Ok(Json::Object(fields)) => fields.keys().map(|k| k.to_uppercase()).collect(),
        _ => return None,
    };
    let prefix = format!("{}_", crate::spec::ENV_PREFIX);
    vars.into_iter().find_map(|var| {
        let rest = var.strip_prefix(&prefix).filter(|_| !var.contains("__"))?;
        let section = sections.iter().find(|s| rest.starts_with(&format!("{s}_")))?;
        let key = &rest[section.len() + 1..];
        Some(format!(
            "{var}: a spec override separates section and key with two underscores: {prefix}{section}__{key}"
        ))
    })
}

/// What `value` should have been, when it does not have the type of `default` (a field's default value); `None`
/// when it fits, or when the default says nothing about the type (an optional field that is unset by default).
fn mismatch(default: &Json, value: &toml::Value) -> Option<&'static str> {
    use toml::Value as T;
    let fits = match default {
        Json::Bool(_) => matches!(value, T::Boolean(_)),
        Json::Number(n) if n.is_f64() => matches!(value, T::Float(_) | T::Integer(_)),
        Json::Number(_) => matches!(value, T::Integer(_)),
        Json::String(_) => matches!(value, T::String(_)),
        Json::Null | Json::Array(_) | Json::Object(_) => true,
    };
    if fits {
        return None;
    }
    Some(match default {
        Json::Bool(_) => "true or false",
        Json::Number(n) if n.is_f64() => "a number",
        Json::Number(_) => "a whole number",
        _ => "a string (in quotes)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        match check("run.toml", text) {
            Err(e) => e.to_string(),
            Ok(()) => panic!("accepted: {text}"),
        }
    }

    #[test]
    fn values_of_another_type_are_refused_naming_the_key() {
        for (text, expected) in [
            (
                "[train]\ntotal_steps = true",
                "train.total_steps = true: expected a whole number",
            ),
            (
                "[train]\ntotal_steps = \"100\"",
                "train.total_steps = \"100\": expected a whole number",
            ),
            (
                "[train]\ntotal_steps = 100.7",
                "train.total_steps = 100.7: expected a whole number",
            ),
            ("[train]\nlr = \"fast\"", "train.lr = \"fast\": expected a number"),
            ("[run]\nname = 7", "run.name = 7: expected a string (in quotes)"),
        ] {
            let message = refused(text);
            assert!(message.contains(expected) && message.contains("run.toml"), "{message}");
        }
    }

    #[test]
    fn an_override_with_one_underscore_is_named_with_the_spelling_that_works() {
        let message = misspelt_override(["LOCKSTEP_TOKEN", "LOCKSTEP_TRAIN_TOTAL_STEPS"]).unwrap();
        assert!(
            message.starts_with("LOCKSTEP_TRAIN_TOTAL_STEPS:") && message.ends_with("LOCKSTEP_TRAIN__TOTAL_STEPS"),
            "{message}"
        );
        // The binaries' own variables, and well-formed overrides, are not mistaken for one.
        let fine = [
            "LOCKSTEP_TOKEN_FILE",
            "LOCKSTEP_LOG_FORMAT",
            "LOCKSTEP_GPU_COMPOSED",
            "LOCKSTEP_TRAIN__TOTAL_STEPS",
            "LOCKSTEP_CHECKPOINT__DIR",
        ];
        assert_eq!(misspelt_override(fine), None);
    }

    #[test]
    fn values_of_the_right_type_pass() {
        check(
            "run.toml",
            "[run]\nname = \"x\"\n[train]\ntotal_steps = 100\nlr = 1\nmin_lr = 1e-5\n[model]\ndropout = 0.1\n",
        )
        .unwrap();
        // Unknown keys and sections are the spec's own check, which names them.
        check("run.toml", "[train]\ntotal_step = \"x\"\n[nope]\na = 1\n").unwrap();
    }
}
