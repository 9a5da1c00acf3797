//! `kiln chat`: an interactive chat with an in-process model. The history is
//! kept for the session; `/exit` or end of input quits.

use std::io::{BufRead, Write};

use anyhow::Context;
use kiln_engine::engine::{EngineHandle, EngineOptions, GenerateEvent, GenerateRequest};
use kiln_engine::sampler::SamplingParams;
use kiln_engine::template::ChatMessage;

use crate::cli::ChatArgs;
use crate::registry::{self, ModelKind};

#[allow(clippy::print_stdout)] // the conversation is the command's output
pub fn run(args: &ChatArgs) -> anyhow::Result<()> {
    crate::serve::init_tracing("warn");
    let home = args.home.resolve();
    let dir = home.join("models");
    let spec = match &args.model {
        Some(m) => m.clone(),
        None => registry::installed(&dir)
            .into_iter()
            .find(|m| m.kind == ModelKind::Text)
            .map(|m| m.name)
            .with_context(|| {
                format!(
                    "no text model installed under {}; try `kiln pull smollm2-135m`",
                    dir.display()
                )
            })?,
    };
    let (name, path) = registry::resolve_text_model(&home, &spec)?;
    let model = registry::load_text_model(&name, &path)?;
    let ctx = model.info().context_length;
    let engine = EngineHandle::start(
        model,
        EngineOptions {
            queue_capacity: 1,
            ..Default::default()
        },
    )?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        history.push(ChatMessage::new("system", system.clone()));
    }
    eprintln!("chatting with {name}; /exit or Ctrl-D quits");
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        if line == "/exit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        history.push(ChatMessage::new("user", line));
        let prompt = engine.chat_prompt(&history)?;
        if prompt.len() >= ctx {
            eprintln!(
                "the conversation is {} tokens, past the model's context of {ctx}; start a new chat",
                prompt.len()
            );
            history.pop();
            continue;
        }
        let room = ctx - prompt.len();
        let mut stream = engine.submit(GenerateRequest {
            prompt,
            sampling: sampling.clone(),
            max_tokens: args.max_tokens.map_or(room, |m| m.min(room)),
            stop: Vec::new(),
            logprobs: None,
            ..Default::default()
        })?;
        let mut reply = String::new();
        while let Some(event) = stream.blocking_next() {
            match event? {
                GenerateEvent::Token { text, .. } => {
                    print!("{text}");
                    stdout.flush()?;
                    reply.push_str(&text);
                }
                GenerateEvent::Finished(_) => break,
            }
        }
        println!();
        history.push(ChatMessage::new("assistant", reply));
    }
    Ok(())
}
