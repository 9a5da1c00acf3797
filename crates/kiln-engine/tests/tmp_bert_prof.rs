use candle_core::{Device, Tensor, DType};
use std::time::Instant;
#[test]
fn prof() -> anyhow::Result<()> {
    let d = Device::Cpu;
    for (m,k,n) in [(448usize,384usize,1536usize),(448,1536,384),(448,384,384)] {
        let a = Tensor::randn(0f32, 1.0, (m,k), &d)?;
        let w = Tensor::randn(0f32, 1.0, (n,k), &d)?;
        let wt = w.t()?.contiguous()?;
        a.matmul(&wt)?;
        let t = Instant::now();
        for _ in 0..50 { a.matmul(&wt)?; }
        let s = t.elapsed().as_secs_f64()/50.0;
        let t2 = Instant::now();
        for _ in 0..50 { a.matmul(&w.t()?)?; }
        let s2 = t2.elapsed().as_secs_f64()/50.0;
        eprintln!("{m}x{k}x{n}: contiguous {:.2} ms {:.1} GFLOP/s; strided {:.2} ms", s*1e3, 2.0*(m*k*n) as f64/s/1e9, s2*1e3);
    }
    let x = Tensor::randn(0f32, 1.0, (448,1536), &d)?;
    let t = Instant::now();
    for _ in 0..50 { x.gelu_erf()?; }
    eprintln!("gelu {:.2} ms", t.elapsed().as_secs_f64()/50.0*1e3);
    let x = Tensor::randn(0f32, 1.0, (448,384), &d)?;
    let b = Tensor::randn(0f32, 1.0, 384, &d)?;
    let t = Instant::now();
    for _ in 0..50 { x.broadcast_add(&b)?; }
    eprintln!("bias add {:.3} ms", t.elapsed().as_secs_f64()/50.0*1e3);
    let _ = DType::F32;
    Ok(())
}
