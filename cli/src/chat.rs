//! `lockstep chat`: talk to a fine-tuned checkpoint in the terminal, through the chat template the model was trained
//! with (`lockstep_common::data::chat`), streaming each reply as it is sampled.
//!
//! ```text
//! lockstep chat --checkpoint runs/my-sft/checkpoints --system "Answer briefly." --temperature 0.7 --seed 7
//! printf 'hello\n/reset\nhi\n' | lockstep chat --checkpoint ckpts/step-00002000 --temperature 0
//! ```
//!
//! Every line read from stdin is a user message (a pipe works as well as a terminal); stdout carries only the
//! replies, one line each, and notes go to stderr. `/reset` forgets the conversation (the `--system` message stays),
//! `/quit` or end of input leaves. The whole conversation is the model's prompt, so when it outgrows the model's
//! context window the oldest exchanges are forgotten first. Without `--seed` the seed comes from the clock and is
//! printed to stderr, so a session can be repeated.
use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::Device;
use lockstep_common::data::Tokenizer;
use lockstep_common::data::chat::{ChatTemplate, Message, Role};
use lockstep_common::data::tokenizer::TextStream;
use lockstep_worker::checkpoint::{self, LoadedModel};
use lockstep_worker::generate::{Generator, generate};
use lockstep_worker::model::Gpt;
use lockstep_worker::sampling::{Sampler, SamplingConfig};

use crate::error::{Error, Result};
use crate::generate::{Sink, clock_seed, resolve_checkpoint};
use crate::sampling_args::{SamplingArgs, SamplingDefaults};

/// The commands a line starting with `/` may give, for the help line.
pub const COMMANDS: &str = "/reset (forget the conversation, keep --system), /quit (or end of input), /help";

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// A checkpoint directory (step-NNNNNNNN), or a directory of them such as the run's checkpoint.dir (the newest
    /// complete one is used). It should be fine-tuned with data.source = "sft".
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A system message that opens the conversation (kept by /reset and when old exchanges are forgotten).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Most tokens per reply; a reply also ends at the model's <|end|> or at its context window.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs<ChatDefaults>,
    /// Seed of the sampling stream, one for the whole session (default: from the clock; printed to stderr).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `lockstep chat` samples at --temperature 0.7, a little more conservatively than `generate`: a reply should
/// stay on the user's question.
#[derive(Debug, Clone, Copy)]
pub struct ChatDefaults;

impl SamplingDefaults for ChatDefaults {
    const TEMPERATURE: &'static str = "0.7";
}

impl ChatArgs {
    /// The sampling settings, checked as `lockstep generate` checks them, and --max-new-tokens, which a reply
    /// needs at least 1 of; errors name the flag.
    pub fn sampling_config(&self) -> Result<SamplingConfig> {
        if self.max_new_tokens == 0 {
            return Err(Error::Usage(
                "--max-new-tokens 0: a reply needs at least 1 token".into(),
            ));
        }
        self.sampling.config()
    }
}

/// The conversation so far: the optional system message, then user and assistant turns, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    system: Option<String>,
    turns: Vec<Message>,
}

impl History {
    pub fn new(system: Option<String>) -> Self {
        Self {
            system,
            turns: Vec::new(),
        }
    }

    pub fn push(&mut self, role: Role, content: impl Into<String>) {
        self.turns.push(Message::new(role, content));
    }

    /// Forgets every turn; the system message stays.
    pub fn reset(&mut self) {
        self.turns.clear();
    }

    /// The user and assistant turns, oldest first.
    pub fn turns(&self) -> &[Message] {
        &self.turns
    }

    /// The messages the template renders: the system message first, then the turns.
    pub fn messages(&self) -> Vec<Message> {
        let system = self.system.iter().map(|s| Message::new(Role::System, s.clone()));
        system.chain(self.turns.iter().cloned()).collect()
    }

    /// Drops the oldest exchange (a user turn and the assistant's reply to it), never the last turn. False when
    /// only the last turn is left.
    fn forget_oldest(&mut self) -> bool {
        if self.turns.len() < 2 {
            return false;
        }
        self.turns.remove(0);
        // A user turn whose reply failed has no assistant turn after it; the history must still start with a user.
        if self.turns.len() > 1 && self.turns[0].role == Role::Assistant {
            self.turns.remove(0);
        }
        true
    }
}

/// A prompt that fits the context window with room for a reply, and what fitting it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fitted {
    pub ids: Vec<u32>,
    /// Turns forgotten (dropped from the history for good: it only grows, so they would never fit again).
    pub forgotten: usize,
    /// Tokens cut from the front of the prompt when even the last message did not fit.
    pub cut: usize,
}

/// Tokens a prompt must leave free in a `block_size` window: `min(max_new_tokens, block_size / 4)`, at least 1.
pub fn room_for_reply(max_new_tokens: usize, block_size: usize) -> usize {
    max_new_tokens.min(block_size / 4).max(1)
}

/// The prompt for the next reply after `history`, at most `block_size - room` tokens (at least 1): the oldest
/// exchanges are forgotten (never the system message) until it fits; if even the last turn alone does not fit,
/// only the prompt's last tokens are kept.
pub fn fit_prompt(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    history: &mut History,
    block_size: usize,
    room: usize,
) -> Result<Fitted> {
    let budget = block_size.saturating_sub(room).max(1);
    let before = history.turns.len();
    loop {
        let ids = template.prompt(tokenizer, &history.messages())?;
        if ids.len() <= budget {
            return Ok(Fitted {
                ids,
                forgotten: before - history.turns.len(),
                cut: 0,
            });
        }
        if !history.forget_oldest() {
            let cut = ids.len() - budget;
            return Ok(Fitted {
                ids: ids[cut..].to_vec(),
                forgotten: before - history.turns.len(),
                cut,
            });
        }
    }
}

/// What a line of input asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    Blank,
    Reset,
    Quit,
    Help,
    /// A `/word` that is no command.
    Unknown(&'a str),
    Message(&'a str),
}

impl<'a> Input<'a> {
    /// A line without its line ending. A command is one `/word`; a line with more (`/usr is a path`) is a message.
    pub fn parse(line: &'a str) -> Self {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return Input::Blank;
        }
        if trimmed.starts_with('/') && !trimmed.contains(char::is_whitespace) {
            return match trimmed {
                "/reset" => Input::Reset,
                "/quit" | "/exit" => Input::Quit,
                "/help" => Input::Help,
                other => Input::Unknown(other),
            };
        }
        Input::Message(line)
    }
}

/// `lockstep chat`: reads stdin, streams replies to stdout, notes to stderr.
pub fn command(args: &ChatArgs) -> Result<()> {
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let stdout = std::io::stdout();
    run(args, &mut stdin.lock(), &mut stdout.lock(), interactive)
}

/// A chat session over `input`'s lines, replies to `out`; `interactive` prints a `you> ` prompt before each line.
pub fn run(args: &ChatArgs, input: &mut impl BufRead, out: &mut impl Write, interactive: bool) -> Result<()> {
    let sampling = args.sampling_config()?;
    let seed = args.seed.unwrap_or_else(clock_seed);
    let dir = resolve_checkpoint(&args.checkpoint)?;
    let loaded = checkpoint::load(&dir, &Device::Cpu)?;
    let template = chat_template(&loaded, &dir)?;
    if let Some(system) = &args.system {
        loaded
            .tokenizer
            .encode(system)
            .map_err(|e| Error::Usage(format!("--system: {}", lockstep_common::error::one_line(&e))))?;
    }
    let model = loaded.model()?;
    let mut session = Session {
        model: &model,
        tokenizer: &loaded.tokenizer,
        template,
        block_size: loaded.cfg.block_size,
        max_new_tokens: args.max_new_tokens,
        sampler: Sampler::new(sampling, seed)?,
        history: History::new(args.system.clone()),
        told_forgetting: false,
    };
    eprintln!(
        "chatting with {} (step {}, context {} tokens, seed {seed}); commands: {COMMANDS}",
        dir.display(),
        loaded.state.step,
        loaded.cfg.block_size
    );
    let mut out = Sink {
        out,
        closed: false,
        what: "the reply",
    };
    let mut line = Vec::new();
    while !out.closed {
        if interactive {
            out.write("you> ")?;
        }
        line.clear();
        let read = input.read_until(b'\n', &mut line).map_err(|source| Error::Io {
            context: "read a message from stdin".into(),
            source,
        })?;
        if read == 0 {
            if interactive {
                out.write("\n")?;
            }
            break;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            eprintln!("error: that line is not UTF-8 text; it was skipped");
            continue;
        };
        match Input::parse(text.trim_end_matches(['\n', '\r'])) {
            Input::Blank => {}
            Input::Quit => break,
            Input::Reset => {
                session.history.reset();
                eprintln!("[conversation cleared]");
            }
            Input::Help => eprintln!("commands: {COMMANDS}"),
            Input::Unknown(word) => eprintln!("{word} is not a command; commands: {COMMANDS}"),
            Input::Message(text) => {
                // A char tokenizer knows only its corpus's characters; one unknown character costs one message,
                // not the session.
                if let Err(e) = loaded.tokenizer.encode(text) {
                    eprintln!(
                        "error: {}; the message was not sent",
                        lockstep_common::error::one_line(&e)
                    );
                    continue;
                }
                session.reply(text, &mut out)?;
            }
        }
    }
    Ok(())
}

/// The checkpoint's chat template; a model whose vocabulary has no room for the special tokens is refused, one
/// that has room but was not fine-tuned on conversations gets a warning.
fn chat_template(loaded: &LoadedModel, dir: &std::path::Path) -> Result<ChatTemplate> {
    if let Some(template) = loaded.chat_template() {
        return Ok(template);
    }
    let template = ChatTemplate::new(&loaded.tokenizer);
    if loaded.cfg.vocab_size < template.vocab_size() {
        return Err(Error::NotChatModel {
            checkpoint: dir.to_path_buf(),
            vocab_size: loaded.cfg.vocab_size,
            needed: template.vocab_size(),
        });
    }
    eprintln!(
        "warning: {} was not fine-tuned on conversations (data.source = \"sft\"), so its replies may not follow \
         the chat template",
        dir.display()
    );
    Ok(template)
}

/// The model, the conversation and the sampling stream of one session.
struct Session<'a> {
    model: &'a Gpt,
    tokenizer: &'a Tokenizer,
    template: ChatTemplate,
    block_size: usize,
    max_new_tokens: usize,
    sampler: Sampler,
    history: History,
    told_forgetting: bool,
}

impl Session<'_> {
    /// Answers the user message `text`, streaming the reply to `out`, and records both in the history.
    fn reply(&mut self, text: &str, out: &mut Sink<impl Write>) -> Result<()> {
        self.history.push(Role::User, text);
        let room = room_for_reply(self.max_new_tokens, self.block_size);
        let fitted = match fit_prompt(&self.template, self.tokenizer, &mut self.history, self.block_size, room) {
            Ok(fitted) => fitted,
            Err(e) => {
                self.history.turns.pop();
                return Err(e);
            }
        };
        if fitted.forgotten > 0 && !self.told_forgetting {
            self.told_forgetting = true;
            eprintln!(
                "[the conversation outgrew the context window of {} tokens: the oldest exchanges are forgotten]",
                self.block_size
            );
        }
        if fitted.cut > 0 {
            eprintln!(
                "[the message does not fit the context window: the model sees only the last {} tokens of the prompt]",
                fitted.ids.len()
            );
        }
        let prompt_len = fitted.ids.len();
        let max_new = self.max_new_tokens.min(self.block_size.saturating_sub(prompt_len));
        let tokenizer = self.tokenizer;
        let (template, eot) = (self.template, tokenizer.eot());
        let is_stop = |t: u32| template.is_special(t) || Some(t) == eot || t as usize >= tokenizer.vocab_size();
        let mut generator = Generator::new(self.model, &[fitted.ids], &Device::Cpu)?;
        let mut stream = TextStream::new(tokenizer);
        let mut reply = Vec::new();
        let mut ended = false;
        generate(&mut generator, &mut self.sampler, max_new, |token| {
            if is_stop(token) {
                ended = true;
                return Ok(ControlFlow::Break(()));
            }
            reply.push(token);
            out.write(&stream.push(token))?;
            Ok(if out.closed {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        out.write(&(stream.finish() + "\n"))?;
        if !ended && !out.closed && prompt_len + reply.len() >= self.block_size {
            eprintln!("[reply cut at the context window]");
        }
        self.history.push(Role::Assistant, tokenizer.decode(&reply));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_common::spec::TokenizerSpec;

    fn tokenizer() -> Tokenizer {
        Tokenizer::for_text(&TokenizerSpec::Char, "abcdefghijklmnopqrstuvwxyz 0123456789.").unwrap()
    }

    fn chat(system: Option<&str>, exchanges: usize) -> History {
        let mut h = History::new(system.map(String::from));
        for i in 0..exchanges {
            h.push(Role::User, format!("question {i}"));
            h.push(Role::Assistant, format!("answer {i}"));
        }
        h.push(Role::User, "last question");
        h
    }

    #[test]
    fn a_history_that_fits_is_the_whole_prompt() {
        let tok = tokenizer();
        let t = ChatTemplate::new(&tok);
        let mut h = chat(Some("be brief"), 2);
        let full = t.prompt(&tok, &h.messages()).unwrap();
        let fitted = fit_prompt(&t, &tok, &mut h, full.len() + 10, 10).unwrap();
        assert_eq!(fitted.ids, full);
        assert_eq!((fitted.forgotten, fitted.cut), (0, 0));
        assert_eq!(h.turns().len(), 5);
    }

    #[test]
    fn oldest_exchanges_go_first_and_the_system_message_stays() {
        let tok = tokenizer();
        let t = ChatTemplate::new(&tok);
        let mut h = chat(Some("be brief"), 3);
        // Room for the system message, the last exchange and the new question, not for one more exchange.
        let mut last_two = chat(Some("be brief"), 0);
        last_two.turns = h.turns()[4..].to_vec();
        let want = t.prompt(&tok, &last_two.messages()).unwrap();
        let (block, room) = (want.len() + 8, 8);
        let fitted = fit_prompt(&t, &tok, &mut h, block, room).unwrap();
        assert_eq!(fitted.ids, want);
        assert!(fitted.ids.len() + room <= block);
        assert_eq!((fitted.forgotten, fitted.cut), (4, 0));
        assert_eq!(h, last_two, "forgotten for good");
        assert_eq!(h.messages()[0], Message::new(Role::System, "be brief"));
        assert_eq!(h.turns()[0], Message::new(Role::User, "question 2"));
        let decoded = t.decode(&tok, &fitted.ids);
        assert!(
            decoded.starts_with("<|system|>be brief<|end|><|user|>question 2<|end|>"),
            "{decoded}"
        );
        assert!(
            decoded.ends_with("<|user|>last question<|end|><|assistant|>"),
            "{decoded}"
        );
    }

    #[test]
    fn a_message_too_long_for_the_window_keeps_its_last_tokens() {
        let tok = tokenizer();
        let t = ChatTemplate::new(&tok);
        let mut h = chat(Some("be brief"), 2);
        h.push(Role::Assistant, "ok");
        h.push(Role::User, "z".repeat(100));
        let (block, room) = (64, room_for_reply(256, 64));
        assert_eq!(room, 16);
        let fitted = fit_prompt(&t, &tok, &mut h, block, room).unwrap();
        assert_eq!(fitted.ids.len(), block - room);
        assert_eq!(h.turns().len(), 1, "every earlier exchange forgotten");
        assert_eq!(fitted.forgotten, 6);
        let full = t.prompt(&tok, &h.messages()).unwrap();
        assert_eq!(fitted.cut, full.len() - (block - room));
        assert_eq!(fitted.ids, full[fitted.cut..]);
        assert!(t.decode(&tok, &fitted.ids).ends_with("zzz<|end|><|assistant|>"));
    }

    #[test]
    fn a_user_turn_without_a_reply_is_forgotten_with_its_neighbours() {
        let tok = tokenizer();
        let t = ChatTemplate::new(&tok);
        let mut h = History::new(None);
        h.push(Role::User, "lost question");
        h.push(Role::User, "question");
        h.push(Role::Assistant, "answer");
        h.push(Role::User, "last");
        let want = t.prompt(&tok, &[Message::new(Role::User, "last")]).unwrap();
        let fitted = fit_prompt(&t, &tok, &mut h, want.len() + 1, 1).unwrap();
        assert_eq!(fitted.ids, want);
        assert_eq!(h.turns(), [Message::new(Role::User, "last")]);
    }

    #[test]
    fn reset_keeps_the_system_message() {
        let mut h = chat(Some("be brief"), 2);
        h.reset();
        assert_eq!(h.messages(), [Message::new(Role::System, "be brief")]);
        assert_eq!(room_for_reply(4, 1024), 4);
        assert_eq!(room_for_reply(256, 2), 1);
    }

    #[test]
    fn lines_are_commands_or_messages() {
        assert_eq!(Input::parse(""), Input::Blank);
        assert_eq!(Input::parse("  \t"), Input::Blank);
        assert_eq!(Input::parse("/reset"), Input::Reset);
        assert_eq!(Input::parse(" /quit "), Input::Quit);
        assert_eq!(Input::parse("/help"), Input::Help);
        assert_eq!(Input::parse("/frobnicate"), Input::Unknown("/frobnicate"));
        assert_eq!(Input::parse("/usr is a path"), Input::Message("/usr is a path"));
        assert_eq!(Input::parse(" hi there"), Input::Message(" hi there"));
    }

    #[test]
    fn flags_are_checked_by_name() {
        let args = |flags: &[&str]| {
            let argv = [&["--checkpoint", "x"], flags].concat();
            crate::sampling_args::test_cli::parse::<ChatArgs>(&argv).unwrap()
        };
        assert!(args(&["--temperature", "0"]).sampling_config().unwrap().is_greedy());
        let err = args(&["--max-new-tokens", "0"])
            .sampling_config()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--max-new-tokens"), "{err}");
        let err = args(&["--temperature=-1"]).sampling_config().unwrap_err().to_string();
        assert!(err.starts_with("--temperature"), "{err}");
    }

    #[test]
    fn temperature_defaults_to_0_7_and_help_says_so() {
        use crate::sampling_args::test_cli;
        let args = test_cli::parse::<ChatArgs>(&["--checkpoint", "x"]).unwrap();
        assert_eq!(args.sampling.temperature, 0.7);
        assert!(!args.sampling_config().unwrap().is_greedy());
        let help = test_cli::help::<ChatArgs>();
        let temperature = test_cli::help_of(&help, "--temperature");
        assert!(temperature.contains("[default: 0.7]"), "{help}");
        assert!(temperature.contains("0 = greedy (argmax)"), "{help}");
    }
}
