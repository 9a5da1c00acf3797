//! Scratch check: compares our logits with a llama.cpp reference JSON.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]
use kiln_engine::gguf::GgufFile;
use kiln_engine::model::transformer::Transformer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut file = GgufFile::open(std::path::Path::new(&args[1])).unwrap();
    let arch = file.architecture().unwrap();
    let t = Transformer::load(&mut file, &arch).unwrap();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    let toks: Vec<u32> = r["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let mut cache = t.new_cache();
    let start = std::time::Instant::now();
    let mut logits = t.forward(&toks, &mut cache).unwrap();
    println!("prefill {:?}", start.elapsed());
    for step in r["steps"].as_array().unwrap() {
        let refs = step.as_array().unwrap();
        let top = kiln_engine::sampler::top_n(&logits, 5);
        let mut maxdiff = 0f32;
        for e in refs {
            let id = e[0].as_u64().unwrap() as usize;
            maxdiff = maxdiff.max((logits[id] - e[1].as_f64().unwrap() as f32).abs());
        }
        println!("ours {:?} | ref top {} {:.4} | max|d| over ref top5 {:.5}", &top[..2], refs[0][0], refs[0][1].as_f64().unwrap(), maxdiff);
        let next = refs[0][0].as_u64().unwrap() as u32;
        logits = t.forward(&[next], &mut cache).unwrap();
    }
}
