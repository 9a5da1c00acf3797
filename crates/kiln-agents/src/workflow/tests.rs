#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use serde_json::{json, Value};

use super::*;
use crate::agent::{
    AgentSpec, ChatModel, Journal, MemoryJournal, ModelError, ModelFuture, ModelReply,
    ModelRequest, RequestedCall,
};
use crate::{Calculator, ToolBox};

struct Cat {
    tools: ToolBox,
}

impl Catalog for Cat {
    fn tools(&self) -> &ToolBox {
        &self.tools
    }
    fn has_model(&self, name: &str) -> bool {
        name == "m"
    }
    fn has_agent(&self, name: &str, version: Option<i64>) -> bool {
        name == "helper" && version.is_none_or(|v| v == 1)
    }
}

fn catalog() -> Cat {
    Cat {
        tools: ToolBox::new().with(Calculator),
    }
}

fn compile(v: Value) -> Result<Workflow, WorkflowError> {
    Workflow::from_value(&v, &catalog())
}

/// Replies in order, recording each request.
struct Scripted {
    replies: Mutex<Vec<ModelReply>>,
    seen: Mutex<Vec<ModelRequest>>,
}

impl Scripted {
    fn new(mut replies: Vec<ModelReply>) -> Scripted {
        replies.reverse();
        Scripted {
            replies: Mutex::new(replies),
            seen: Mutex::new(Vec::new()),
        }
    }
}

impl ChatModel for Scripted {
    fn chat<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a> {
        self.seen.lock().unwrap().push(request.clone());
        let next = self.replies.lock().unwrap().pop();
        Box::pin(async move { next.ok_or_else(|| ModelError::fatal("script ended")) })
    }
}

fn says(text: &str) -> ModelReply {
    ModelReply {
        content: Some(text.into()),
        prompt_tokens: 20,
        completion_tokens: 10,
        finish_reason: Some("stop".into()),
        ..ModelReply::default()
    }
}

struct TestEnv {
    model: Scripted,
    tools: ToolBox,
}

impl WorkflowEnv for TestEnv {
    fn model(&self) -> &dyn ChatModel {
        &self.model
    }
    fn tools(&self) -> &ToolBox {
        &self.tools
    }
    fn retrieve<'a>(&'a self, kb: &'a str, query: &'a str, top_k: u32) -> RetrieveFuture<'a> {
        let hits: Vec<Value> = (0..top_k.min(2))
            .map(|i| json!({"document": format!("{kb}.md"), "heading": "", "text": format!("{query} #{i}"), "score": 1.0}))
            .collect();
        Box::pin(async move { Ok(Value::Array(hits)) })
    }
    fn agent<'a>(&'a self, name: &'a str, version: Option<i64>) -> AgentFuture<'a> {
        Box::pin(async move {
            let spec = AgentSpec::from_json(
                &json!({"name": name, "model": "m", "tools": ["calculator"]}).to_string(),
                &self.tools,
            )
            .map_err(|e| e.to_string())?;
            Ok((spec, version.unwrap_or(1)))
        })
    }
}

fn env(replies: Vec<ModelReply>) -> TestEnv {
    TestEnv {
        model: Scripted::new(replies),
        tools: ToolBox::new().with(Calculator),
    }
}

fn triage() -> Value {
    json!({
        "name": "triage",
        "inputs": {"ticket": {"type": "string"}, "n": {"type": "integer", "default": 3}},
        "steps": [
            {"id": "reply", "kind": "model", "model": "m", "needs": ["route"],
             "prompt": "Answer: {{ inputs.ticket }}"},
            {"id": "classify", "kind": "model", "model": "m",
             "prompt": "Classify: {{ inputs.ticket }}",
             "output": {"type": "object", "properties": {"urgent": {"type": "boolean"}, "cost": {"type": "integer"}},
                        "required": ["urgent", "cost"]}},
            {"id": "route", "kind": "branch", "if": "{{ steps.classify.output.urgent }}",
             "then": ["price"], "else": ["reply"]},
            {"id": "price", "kind": "tool", "tool": "calculator",
             "arguments": {"expression": "{{ steps.classify.output.cost }} * {{ inputs.n }}"}},
        ],
        "output": {"answer": "{{ coalesce(steps.price.output, steps.reply.output) }}",
                   "urgent": "{{ steps.classify.output.urgent }}"},
    })
}

#[test]
fn steps_run_after_what_they_need_in_declared_order_otherwise() {
    let w = compile(triage()).unwrap();
    let order: Vec<&str> = w.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(order, ["classify", "route", "reply", "price"]);
    let reply = &w.steps[2];
    assert_eq!(reply.gate, Some(("route".into(), false)));
    assert_eq!(w.steps[0].output_type.field("cost").unwrap(), Type::Integer);
}

#[test]
fn bad_graphs_are_refused_naming_the_step() {
    let mut cyclic = triage();
    cyclic["steps"][1]["needs"] = json!(["reply"]);
    let e = compile(cyclic).unwrap_err();
    assert!(e.message.contains("cycle"), "{e}");
    assert!(e.message.contains("→"), "{e}");

    let mut unknown = triage();
    unknown["steps"][3]["arguments"]["expression"] = json!("{{ steps.clasify.output.cost }}");
    let e = compile(unknown).unwrap_err();
    assert_eq!(e.step.as_deref(), Some("`price` (steps[3])"), "{e}");
    assert!(e.message.contains("clasify"), "{e}");

    let mut field = triage();
    field["steps"][3]["arguments"]["expression"] = json!("{{ steps.classify.output.price }}");
    let e = compile(field).unwrap_err();
    assert!(e.message.contains("has no field `price`"), "{e}");
    assert!(
        e.to_string().contains("`price` (steps[3]), `arguments`"),
        "{e}"
    );

    let mut not_bool = triage();
    not_bool["steps"][2]["if"] = json!("{{ steps.classify.output.cost }}");
    let e = compile(not_bool).unwrap_err();
    assert_eq!(e.field, "if");
    assert!(e.message.contains("true or false"), "{e}");

    let mut arg_type = triage();
    arg_type["steps"][3]["arguments"] = json!({"expression": "{{ inputs.n }}"});
    let e = compile(arg_type).unwrap_err();
    assert!(e.message.contains("an integer, not a string"), "{e}");

    let mut tool = triage();
    tool["steps"][3]["tool"] = json!("shell");
    assert!(compile(tool)
        .unwrap_err()
        .message
        .contains("no tool `shell`"));

    let mut dup = triage();
    dup["steps"][3]["id"] = json!("route");
    assert!(compile(dup).unwrap_err().message.contains("also called"));

    let mut arm = triage();
    arm["steps"][2]["then"] = json!(["nowhere"]);
    assert!(compile(arm).unwrap_err().message.contains("nowhere"));

    let mut kind = triage();
    kind["steps"][0]["kind"] = json!("shell");
    assert!(compile(kind)
        .unwrap_err()
        .message
        .contains("not a step kind"));

    let map_over_text = json!({"name": "m", "inputs": {"t": {"type": "string"}}, "steps": [
        {"id": "each", "kind": "map", "over": "{{ inputs.t }}",
         "step": {"kind": "tool", "tool": "calculator", "arguments": {"expression": "{{ item }}"}}}]});
    assert!(compile(map_over_text)
        .unwrap_err()
        .message
        .contains("must be a list"));

    let nested_approval = json!({"name": "m", "inputs": {"t": {"type": "array"}}, "steps": [
        {"id": "each", "kind": "map", "over": "{{ inputs.t }}", "step": {"kind": "approval"}}]});
    assert_eq!(compile(nested_approval).unwrap_err().field, "step.kind");

    let agent = json!({"name": "m", "steps": [{"id": "a", "kind": "agent", "agent": "nobody", "input": "x"}]});
    assert!(compile(agent)
        .unwrap_err()
        .message
        .contains("no agent `nobody`"));
}

#[test]
fn inputs_are_checked_and_defaulted() {
    let w = compile(triage()).unwrap();
    assert_eq!(
        w.check_inputs(&json!({"ticket": "t"})).unwrap(),
        json!({"ticket": "t", "n": 3})
    );
    assert!(w
        .check_inputs(&json!({}))
        .unwrap_err()
        .contains("`ticket` is missing"));
    assert!(w
        .check_inputs(&json!({"ticket": 4}))
        .unwrap_err()
        .contains("`ticket` is an integer, not a string"));
    assert!(w
        .check_inputs(&json!({"ticket": "t", "x": 1}))
        .unwrap_err()
        .contains("no input `x`"));
    assert!(w.check_inputs(&json!("t")).is_err());
}

#[tokio::test]
async fn a_branch_picks_a_side_and_the_other_is_skipped() {
    let w = compile(triage()).unwrap();
    let inputs = w.check_inputs(&json!({"ticket": "fire"})).unwrap();
    let e = env(vec![says(r#"{"urgent": true, "cost": 7}"#)]);
    let journal = MemoryJournal::new();
    let run = run_workflow(&w, &inputs, &e, &journal).await;
    assert_eq!(
        run.outcome,
        WorkflowOutcome::Succeeded(json!({"answer": "21", "urgent": true}))
    );
    assert_eq!(run.skipped, ["reply"]);
    assert_eq!(run.tokens, 30);
    {
        let seen = e.model.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].response_format.as_ref().unwrap()["type"],
            "json_schema"
        );
    }
    let paths: Vec<String> = journal
        .steps()
        .iter()
        .map(|(s, _)| s.path.clone())
        .collect();
    assert_eq!(paths, ["classify", "price"]);

    let e = env(vec![
        says(r#"{"urgent": false, "cost": 7}"#),
        says("Turn it off."),
    ]);
    let run = run_workflow(&w, &inputs, &e, &MemoryJournal::new()).await;
    assert_eq!(
        run.outcome,
        WorkflowOutcome::Succeeded(json!({"answer": "Turn it off.", "urgent": false}))
    );
    assert_eq!(run.skipped, ["price"]);
}

#[tokio::test]
async fn a_replay_takes_recorded_steps_from_the_journal() {
    let w = compile(triage()).unwrap();
    let inputs = w.check_inputs(&json!({"ticket": "fire"})).unwrap();
    let journal = MemoryJournal::new();
    let first = run_workflow(
        &w,
        &inputs,
        &env(vec![says(r#"{"urgent": true, "cost": 2}"#)]),
        &journal,
    )
    .await;
    let again = env(Vec::new());
    let second = run_workflow(&w, &inputs, &again, &journal).await;
    assert_eq!(first.outcome, second.outcome);
    assert!(
        again.model.seen.lock().unwrap().is_empty(),
        "nothing asked twice"
    );
}

#[tokio::test]
async fn a_schema_reply_cut_short_fails_the_step() {
    let w = compile(triage()).unwrap();
    let inputs = w.check_inputs(&json!({"ticket": "fire"})).unwrap();
    let mut cut = says(r#"{"urgent": tr"#);
    cut.finish_reason = Some("length".into());
    let run = run_workflow(&w, &inputs, &env(vec![cut]), &MemoryJournal::new()).await;
    let WorkflowOutcome::Failed(why) = run.outcome else {
        panic!("{:?}", run.outcome)
    };
    assert!(
        why.contains("step `classify`") && why.contains("cut"),
        "{why}"
    );
    let wrong = says(r#"{"urgent": "yes", "cost": 1}"#);
    let run = run_workflow(&w, &inputs, &env(vec![wrong]), &MemoryJournal::new()).await;
    let WorkflowOutcome::Failed(why) = run.outcome else {
        panic!()
    };
    assert!(why.contains("`urgent` is a string"), "{why}");
}

#[tokio::test]
async fn a_map_runs_each_element_and_keeps_their_order() {
    let w = compile(json!({
        "name": "sums",
        "inputs": {"xs": {"type": "array", "items": {"type": "integer"}}},
        "steps": [
            {"id": "each", "kind": "map", "over": "{{ inputs.xs }}", "concurrency": 3,
             "step": {"kind": "tool", "tool": "calculator",
                      "arguments": {"expression": "{{ item }} * {{ index }}"}}},
            {"id": "docs", "kind": "retrieve", "knowledge_base": "handbook",
             "query": "{{ join(steps.each.output, ',') }}", "top_k": 2},
        ],
        "output": {"products": "{{ steps.each.output }}", "first": "{{ steps.docs.output[0].text }}"},
    }))
    .unwrap();
    let inputs = json!({"xs": [5, 6, 7, 8, 9]});
    let journal = MemoryJournal::new();
    let run = run_workflow(&w, &inputs, &env(Vec::new()), &journal).await;
    assert_eq!(
        run.outcome,
        WorkflowOutcome::Succeeded(
            json!({"products": ["0", "6", "14", "24", "36"], "first": "0,6,14,24,36 #0"})
        )
    );
    let mut paths: Vec<String> = journal
        .steps()
        .iter()
        .map(|(s, _)| s.path.clone())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        ["docs", "each[0]", "each[1]", "each[2]", "each[3]", "each[4]"]
    );
    assert_eq!(run.calls, 6);
}

#[tokio::test]
async fn limits_stop_a_run_cleanly() {
    let mut v = triage();
    v["max_steps"] = json!(1);
    let w = compile(v).unwrap();
    let inputs = w.check_inputs(&json!({"ticket": "x"})).unwrap();
    let run = run_workflow(
        &w,
        &inputs,
        &env(vec![says(r#"{"urgent": true, "cost": 1}"#)]),
        &MemoryJournal::new(),
    )
    .await;
    let WorkflowOutcome::Failed(why) = run.outcome else {
        panic!()
    };
    assert!(why.contains("`max_steps`"), "{why}");

    let mut v = triage();
    v["max_tokens"] = json!(100);
    let w = compile(v).unwrap();
    let run = run_workflow(
        &w,
        &inputs,
        &env(vec![says(r#"{"urgent": true, "cost": 1}"#)]),
        &MemoryJournal::new(),
    )
    .await;
    let WorkflowOutcome::Failed(why) = run.outcome else {
        panic!()
    };
    assert!(why.contains("budget of 100 tokens"), "{why}");
}

fn approval_flow(on_reject: &str) -> Workflow {
    compile(json!({
        "name": "pay",
        "inputs": {"amount": {"type": "number"}},
        "steps": [
            {"id": "ok", "kind": "approval", "message": "Pay {{ inputs.amount }}?", "group": "finance",
             "on_reject": on_reject},
            {"id": "pay", "kind": "tool", "tool": "calculator", "when": "{{ steps.ok.output.approved }}",
             "arguments": {"expression": "{{ inputs.amount }} + 0"}},
        ],
        "output": "{{ steps.ok.output.by }}: {{ coalesce(steps.pay.output, 'not paid') }}",
    }))
    .unwrap()
}

#[tokio::test]
async fn an_approval_waits_for_a_decision_recorded_in_the_journal() {
    let w = approval_flow("fail");
    let inputs = json!({"amount": 12});
    let journal = MemoryJournal::new();
    let run = run_workflow(&w, &inputs, &env(Vec::new()), &journal).await;
    assert_eq!(run.outcome, WorkflowOutcome::Waiting { path: "ok".into() });
    let steps = journal.steps();
    assert_eq!(steps[0].0.input["message"], "Pay 12?");
    assert_eq!(steps[0].0.input["group"], "finance");
    // Asked again before anyone decided: still waiting, nothing run.
    let run = run_workflow(&w, &inputs, &env(Vec::new()), &journal).await;
    assert_eq!(run.outcome, WorkflowOutcome::Waiting { path: "ok".into() });

    journal
        .finish(
            "ok",
            true,
            &json!({"approved": true, "by": "key_ab", "comment": ""}),
        )
        .await
        .unwrap();
    let run = run_workflow(&w, &inputs, &env(Vec::new()), &journal).await;
    assert_eq!(run.outcome, WorkflowOutcome::Succeeded(json!("key_ab: 12")));

    let rejected = MemoryJournal::new();
    run_workflow(&w, &inputs, &env(Vec::new()), &rejected).await;
    rejected
        .finish(
            "ok",
            true,
            &json!({"approved": false, "by": "key_cd", "comment": "too much"}),
        )
        .await
        .unwrap();
    let run = run_workflow(&w, &inputs, &env(Vec::new()), &rejected).await;
    let WorkflowOutcome::Failed(why) = run.outcome else {
        panic!()
    };
    assert!(why.contains("rejected by key_cd: too much"), "{why}");

    let w = approval_flow("continue");
    let run = run_workflow(&w, &inputs, &env(Vec::new()), &rejected).await;
    assert_eq!(
        run.outcome,
        WorkflowOutcome::Succeeded(json!("key_cd: not paid"))
    );
}

#[tokio::test]
async fn a_sub_agent_journals_its_steps_under_the_step() {
    let w = compile(json!({
        "name": "delegate",
        "steps": [{"id": "research", "kind": "agent", "agent": "helper", "input": "What is 6*7?"}],
    }))
    .unwrap();
    let calc = ModelReply {
        tool_calls: vec![RequestedCall {
            id: "c1".into(),
            name: "calculator".into(),
            arguments: r#"{"expression": "6*7"}"#.into(),
        }],
        prompt_tokens: 10,
        completion_tokens: 5,
        ..ModelReply::default()
    };
    let journal = MemoryJournal::new();
    let run = run_workflow(&w, &json!({}), &env(vec![calc, says("42")]), &journal).await;
    assert_eq!(
        run.outcome,
        WorkflowOutcome::Succeeded(json!({"research": "42"}))
    );
    let paths: Vec<String> = journal
        .steps()
        .iter()
        .map(|(s, _)| s.path.clone())
        .collect();
    assert_eq!(
        paths,
        ["research/version", "research/0", "research/1", "research/2"]
    );
    assert_eq!(run.tokens, 45);
}

#[tokio::test]
async fn no_model_step_starts_once_the_cost_budget_is_spent() {
    let mut v = triage();
    v["max_cost"] = json!(0.5);
    let w = compile(v).unwrap();
    let inputs = w.check_inputs(&json!({"ticket": "x"})).unwrap();
    let pricey = |text: &str, nanos: u64| ModelReply {
        cost_nanos: nanos,
        ..says(text)
    };
    // Under budget after the first call: the second runs.
    let e = env(vec![
        pricey(r#"{"urgent": false, "cost": 1}"#, 400_000_000),
        pricey("ok", 1),
    ]);
    let run = run_workflow(&w, &inputs, &e, &MemoryJournal::new()).await;
    assert!(
        matches!(run.outcome, WorkflowOutcome::Succeeded(_)),
        "{:?}",
        run.outcome
    );
    assert_eq!(run.cost_nanos, 400_000_001);
    // Spent by the first call: the second does not start.
    let e = env(vec![
        pricey(r#"{"urgent": false, "cost": 1}"#, 500_000_000),
        pricey("ok", 1),
    ]);
    let run = run_workflow(&w, &inputs, &e, &MemoryJournal::new()).await;
    let WorkflowOutcome::Failed(why) = run.outcome else {
        panic!()
    };
    assert!(
        why.contains("step `reply` was not started") && why.contains("budget of 0.5 (0.5 spent)"),
        "{why}"
    );
    assert_eq!(e.model.seen.lock().unwrap().len(), 1);
    let mut bad = triage();
    bad["max_cost"] = json!(0);
    assert_eq!(compile(bad).unwrap_err().field, "max_cost");
}
