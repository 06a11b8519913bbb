use candle_core::{Device, Tensor};
use std::collections::HashMap;
#[test]
fn debug_ddim() {
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/reference/scheduler_steps.safetensors"
        ),
        &Device::Cpu,
    )
    .unwrap();
    let x: Vec<f32> = t["sample"].flatten_all().unwrap().to_vec1().unwrap();
    let e: Vec<f32> = t["ddim_epsilon.eps.0"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let r: Vec<f32> = t["ddim_epsilon.x.0"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ac: Vec<f64> = {
        let s = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/reference/schedulers.json"
        ))
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        v["alphas_cumprod"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let a = ac[831] as f32;
    let ap = ac[665] as f32;
    let b = 1.0 - a;
    let (sa, sb) = (a.sqrt(), b.sqrt());
    let dir = (1.0 - ap).sqrt();
    let sap = ap.sqrt();
    let mut mism = [0usize; 4];
    for i in 0..x.len() {
        let x0 = (x[i] - sb * e[i]) / sa;
        let v0 = sap * x0 + dir * e[i];
        let x0f = (-sb).mul_add(e[i], x[i]) / sa;
        let v1 = sap.mul_add(x0f, dir * e[i]);
        let v2 = sap * x0f + dir * e[i];
        let v3 = sap * ((x[i] - sb * e[i]) * (1.0 / sa)) + dir * e[i];
        for (k, v) in [v0, v1, v2, v3].iter().enumerate() {
            if *v != r[i] {
                mism[k] += 1;
            }
        }
    }
    let mut shown = 0;
    for i in 0..x.len() {
        let x0 = (x[i] - sb * e[i]) / sa;
        let v0 = sap * x0 + dir * e[i];
        if v0 != r[i] && shown < 8 {
            shown += 1;
            let (a64, ap64) = (ac[831], ac[665]);
            let exact = ap64.sqrt()
                * ((x[i] as f64 - (1.0 - a64).sqrt() * e[i] as f64) / a64.sqrt())
                + (1.0 - ap64).sqrt() * e[i] as f64;
            let ulp = f32::from_bits(v0.to_bits() + 1) - v0;
            eprintln!(
                "i {i} x {} e {} ours {v0} ref {} exact {exact} diff_ulps {}",
                x[i],
                e[i],
                r[i],
                (r[i] - v0) / ulp
            );
        }
    }
    eprintln!(
        "mismatches plain/fma-all/fma-x0/recip: {:?} of {}",
        mism,
        x.len()
    );
}
