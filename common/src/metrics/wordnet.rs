//! A reader of a WordNet 3.0 database directory (the `dict` directory of Princeton's distribution; Debian's
//! `wordnet-base` installs one at `/usr/share/wordnet`) answering what METEOR's synonym stage asks of nltk:
//! `wordnet.synsets(word)` — with nltk's `morphy` lemmatisation — and each synset's lemma names.
//!
//! It reads `index.{noun,verb,adj,adv}`, `data.{noun,verb,adj,adv}` and `{noun,verb,adj,adv}.exc`. The whole
//! database is parsed once by [`Wordnet::open`] (about 120,000 synsets) and checked there, so lookups cannot fail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A part of speech, in the order nltk's `synsets` visits them (`POS_LIST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pos {
    Noun = 0,
    Verb = 1,
    Adj = 2,
    Adv = 3,
}

impl Pos {
    pub const ALL: [Pos; 4] = [Pos::Noun, Pos::Verb, Pos::Adj, Pos::Adv];

    fn file_suffix(self) -> &'static str {
        match self {
            Pos::Noun => "noun",
            Pos::Verb => "verb",
            Pos::Adj => "adj",
            Pos::Adv => "adv",
        }
    }

    /// nltk's `MORPHOLOGICAL_SUBSTITUTIONS`: (ending, replacement), tried in this order.
    fn substitutions(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Pos::Noun => &[
                ("s", ""),
                ("ses", "s"),
                ("ves", "f"),
                ("xes", "x"),
                ("zes", "z"),
                ("ches", "ch"),
                ("shes", "sh"),
                ("men", "man"),
                ("ies", "y"),
            ],
            Pos::Verb => &[
                ("s", ""),
                ("ies", "y"),
                ("es", "e"),
                ("es", ""),
                ("ed", "e"),
                ("ed", ""),
                ("ing", "e"),
                ("ing", ""),
            ],
            Pos::Adj => &[("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
            Pos::Adv => &[],
        }
    }
}

/// An open WordNet database.
#[derive(Debug)]
pub struct Wordnet {
    /// lemma → synset offsets per part of speech (`None`: the lemma has no entry for that part of speech).
    index: HashMap<String, [Option<Vec<u64>>; 4]>,
    /// Per part of speech: synset offset → its lemma names, case and underscores as in the data file.
    synsets: [HashMap<u64, Vec<String>>; 4],
    /// Per part of speech: irregular inflected form → its base forms (the `.exc` files).
    exceptions: [HashMap<String, Vec<String>>; 4],
}

fn read_text(dir: &Path, name: &str) -> Result<(PathBuf, String)> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((path, text)),
        Err(e) => Err(Error::Data {
            message: format!(
                "cannot read this WordNet file ({e}); point to a WordNet 3.0 dict directory \
                 (Debian/Ubuntu: `apt-get install wordnet-base` installs /usr/share/wordnet)"
            ),
            path,
        }),
    }
}

fn bad_line(path: &Path, line: usize, what: &str) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        message: format!("line {line}: {what}; is this a WordNet 3.0 database?"),
    }
}

/// nltk strips an adjective's syntactic marker such as `(a)`, `(p)` or `(ip)` from a lemma name with
/// `re.match(r"(.*?)(\([^()]*\))?$")`: a final parenthesised group without parentheses inside.
fn strip_marker(name: &str) -> &str {
    if let Some(inner) = name.strip_suffix(')')
        && let Some(open) = inner.rfind('(')
        && !inner[open + 1..].contains(')')
    {
        return &name[..open];
    }
    name
}

impl Wordnet {
    /// Opens the WordNet 3.0 database in `dir`, reading and checking every file METEOR needs.
    pub fn open(dir: impl AsRef<Path>) -> Result<Wordnet> {
        let dir = dir.as_ref();
        let mut wordnet = Wordnet {
            index: HashMap::new(),
            synsets: Default::default(),
            exceptions: Default::default(),
        };
        for pos in Pos::ALL {
            wordnet.read_data(dir, pos)?;
            wordnet.read_exceptions(dir, pos)?;
        }
        for pos in Pos::ALL {
            wordnet.read_index(dir, pos)?;
        }
        Ok(wordnet)
    }

    fn read_data(&mut self, dir: &Path, pos: Pos) -> Result<()> {
        let (path, text) = read_text(dir, &format!("data.{}", pos.file_suffix()))?;
        let map = &mut self.synsets[pos as usize];
        for (n, line) in text.lines().enumerate() {
            // The licence at the top of every data file is indented.
            if line.starts_with(' ') || line.is_empty() {
                continue;
            }
            let mut fields = line.split_ascii_whitespace();
            let mut next = |what: &str| fields.next().ok_or_else(|| bad_line(&path, n + 1, what));
            let offset: u64 = next("missing synset offset")?
                .parse()
                .map_err(|_| bad_line(&path, n + 1, "bad offset"))?;
            next("missing lexicographer file number")?;
            next("missing synset type")?;
            let count = usize::from_str_radix(next("missing word count")?, 16)
                .map_err(|_| bad_line(&path, n + 1, "bad word count"))?;
            let mut names = Vec::with_capacity(count);
            for _ in 0..count {
                names.push(strip_marker(next("missing word")?).to_string());
                next("missing lex_id")?;
            }
            map.insert(offset, names);
        }
        Ok(())
    }

    fn read_exceptions(&mut self, dir: &Path, pos: Pos) -> Result<()> {
        let (_, text) = read_text(dir, &format!("{}.exc", pos.file_suffix()))?;
        let map = &mut self.exceptions[pos as usize];
        for line in text.lines() {
            let mut terms = line.split_ascii_whitespace().map(str::to_string);
            if let Some(inflected) = terms.next() {
                // A later line for the same form replaces an earlier one, as in nltk's dict.
                map.insert(inflected, terms.collect());
            }
        }
        Ok(())
    }

    fn read_index(&mut self, dir: &Path, pos: Pos) -> Result<()> {
        let (path, text) = read_text(dir, &format!("index.{}", pos.file_suffix()))?;
        for (n, line) in text.lines().enumerate() {
            if line.starts_with(' ') || line.is_empty() {
                continue;
            }
            let bad = |what: &str| bad_line(&path, n + 1, what);
            let mut fields = line.split_ascii_whitespace();
            let mut next = |what: &str| fields.next().ok_or_else(|| bad(what));
            let lemma = next("missing lemma")?.to_string();
            let line_pos = match next("missing part of speech")? {
                "n" => Pos::Noun,
                "v" => Pos::Verb,
                "a" | "s" => Pos::Adj,
                "r" => Pos::Adv,
                other => return Err(bad(&format!("unknown part of speech {other:?}"))),
            };
            let number = |s: &str| s.parse::<usize>().map_err(|_| bad(&format!("{s:?} is not a count")));
            let n_synsets = number(next("missing synset count")?)?;
            let n_pointers = number(next("missing pointer count")?)?;
            for _ in 0..n_pointers {
                next("missing pointer symbol")?;
            }
            next("missing sense count")?;
            next("missing tagged sense count")?;
            let mut offsets = Vec::with_capacity(n_synsets);
            for _ in 0..n_synsets {
                let field = next("missing synset offset")?;
                let offset: u64 = field
                    .parse()
                    .map_err(|_| bad(&format!("{field:?} is not a synset offset")))?;
                if !self.synsets[line_pos as usize].contains_key(&offset) {
                    return Err(bad(&format!(
                        "{lemma}: synset {offset} is not in data.{}",
                        line_pos.file_suffix()
                    )));
                }
                offsets.push(offset);
            }
            self.index.entry(lemma).or_default()[line_pos as usize] = Some(offsets);
        }
        Ok(())
    }

    fn has(&self, form: &str, pos: Pos) -> bool {
        self.index.get(form).is_some_and(|entry| entry[pos as usize].is_some())
    }

    /// nltk 3.10's `WordNetCorpusReader._morphy(form, pos)`: the forms among `form` itself and its candidate base
    /// forms that the index knows for `pos`, first seen first. The candidates come from the exception list when
    /// `form` is in it, otherwise from one round of suffix substitutions (nltk 3.10 no longer repeats the rules).
    pub fn morphy(&self, form: &str, pos: Pos) -> Vec<String> {
        let mut candidates = vec![form.to_string()];
        match self.exceptions[pos as usize].get(form) {
            Some(bases) => candidates.extend(bases.iter().cloned()),
            None => {
                for &(ending, replacement) in pos.substitutions() {
                    if let Some(stem) = form.strip_suffix(ending) {
                        candidates.push(format!("{stem}{replacement}"));
                    }
                }
            }
        }
        let mut found: Vec<String> = Vec::new();
        for c in candidates {
            if self.has(&c, pos) && !found.contains(&c) {
                found.push(c);
            }
        }
        found
    }

    /// The lemma names of each synset nltk's `wordnet.synsets(word)` returns, in its order (noun, verb,
    /// adjective, adverb; within each, morphy's forms and the index's sense order).
    pub fn synsets(&self, word: &str) -> Vec<&[String]> {
        let word = word.to_lowercase();
        let mut out = Vec::new();
        for pos in Pos::ALL {
            for form in self.morphy(&word, pos) {
                let offsets = self.index.get(&form).and_then(|entry| entry[pos as usize].as_ref());
                for offset in offsets.into_iter().flatten() {
                    // open() checked that every indexed offset has a synset.
                    if let Some(names) = self.synsets[pos as usize].get(offset) {
                        out.push(names.as_slice());
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_adjective_markers_like_nltk() {
        assert_eq!(strip_marker("galore(ip)"), "galore");
        assert_eq!(strip_marker("beautiful(a)"), "beautiful");
        assert_eq!(strip_marker("x(a)(p)"), "x(a)");
        assert_eq!(strip_marker("x(a))"), "x(a))");
        assert_eq!(strip_marker("a(b)c"), "a(b)c");
        assert_eq!(strip_marker("plain"), "plain");
        assert_eq!(strip_marker("()"), "");
    }

    #[test]
    fn missing_directory_says_how_to_install() {
        let err = Wordnet::open("/nonexistent/wordnet")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/nonexistent/wordnet"), "{err}");
        assert!(err.contains("wordnet-base"), "{err}");
    }
}
