//! `sluice bench --backend cuda`: the gate as an engine runs it, `route_into` on a stream,
//! replayed from a CUDA graph and enqueued eagerly, beside the memory floor of each cell. With
//! `--dispatch`, the gate again with the layout of its ids, side by side as one
//! `route_and_dispatch_into` call and as `route_into` then `dispatch_into`: what each adds to the
//! graph-replayed gate, and the layout alone.

use serde_json::json;
use sluice_backend_cuda::timing::{GateBench, LayoutBench};
use sluice_tensor::DType;

use super::{BenchArgs, InputDType};
use crate::error::CliError;
use crate::io;

/// Times every T on the GPU and prints (and optionally writes) the results.
pub fn run(args: &BenchArgs) -> Result<(), CliError> {
    if args.checkpoint.is_some() {
        return Err(CliError::Input(
            "--backend cuda times the gate on synthetic weights of a --model shape; \
             --checkpoint is not supported there yet"
                .into(),
        ));
    }
    let block_size = args.block_size.map(|block| block as usize);
    let layout = args.dispatch.then_some(LayoutBench { block_size, one_call: true, alone: true });
    let backend = args.backend.cuda()?;
    let spec = args.model.spec();
    let (h, e, k) = (args.model.hidden_size(), spec.num_experts, spec.top_k);
    let bandwidth = backend.copy_bandwidth()?;
    println!(
        "sluice bench: {} gate ({h} -> {e}, {spec}), {} input, bf16 weight, cuda backend \
         (device {}, {} SMs), copy bandwidth {:.2} TB/s",
        args.model.name(),
        args.dtype.name(),
        args.backend.device,
        backend.multiprocessors(),
        bandwidth / 1e12
    );
    print!(
        "{:>6}  {:>10}  {:>10}  {:>10}  {:>10}  {:>8}  {:>4}",
        "T", "graph us", "graph min", "eager us", "floor us", "x floor", "sets"
    );
    if layout.is_some() {
        print!(
            "  {:>14}  {:>9}  {:>14}  {:>10}",
            "+layout us", "added us", "2 calls added", "layout us"
        );
    }
    println!();
    let hidden_bytes = match args.dtype {
        InputDType::Bf16 => 2,
        InputDType::F32 => 4,
    };
    let mut results = Vec::with_capacity(args.tokens.len());
    for &tokens in &args.tokens {
        let bench = GateBench {
            spec,
            hidden_size: h,
            tokens,
            hidden_dtype: match args.dtype {
                InputDType::Bf16 => DType::BF16,
                InputDType::F32 => DType::F32,
            },
            target_seconds: args.min_seconds,
            layout: None,
        };
        let times = backend.time_gate(&bench)?;
        let time_with = |layout| backend.time_gate(&GateBench { layout: Some(layout), ..bench });
        let with_layout = layout.map(time_with).transpose()?;
        let two_calls = layout
            .map(|layout| time_with(LayoutBench { one_call: false, alone: false, ..layout }))
            .transpose()?;
        // The fewest bytes the gate moves: hidden states, weight, bias, ids and weights out.
        let bytes = tokens * h * hidden_bytes + e * h * 2 + e * 4 + tokens * k * 8;
        let floor_us = bytes as f64 / bandwidth * 1e6;
        print!(
            "{tokens:>6}  {:>10.2}  {:>10.2}  {:>10.2}  {floor_us:>10.2}  {:>8.2}  {:>4}",
            times.graph.median_us,
            times.graph.min_us,
            times.eager.median_us,
            times.graph.median_us / floor_us,
            times.sets
        );
        // What the layout adds: the two graph-replayed medians, gate + layout minus gate alone.
        let added_us = with_layout.map(|w| w.graph.median_us - times.graph.median_us);
        let two_calls_added_us = two_calls.map(|w| w.graph.median_us - times.graph.median_us);
        let layout_us = with_layout.and_then(|w| w.layout).map(|l| l.median_us);
        if let (Some(with_layout), Some(added_us), Some(two_calls_added_us), Some(layout_us)) =
            (with_layout, added_us, two_calls_added_us, layout_us)
        {
            print!(
                "  {:>14.2}  {added_us:>9.2}  {two_calls_added_us:>14.2}  {layout_us:>10.2}",
                with_layout.graph.median_us
            );
        }
        println!();
        results.push(json!({
            "model": args.model.name(),
            "tokens": tokens,
            "dtype": args.dtype.name(),
            "backend": "cuda",
            "graph_us": times.graph.median_us,
            "graph_min_us": times.graph.min_us,
            "eager_us": times.eager.median_us,
            "eager_min_us": times.eager.min_us,
            "floor_mem_us": floor_us,
            "sets": times.sets,
            "repetitions": times.graph.repetitions,
            "graph_with_layout_us": with_layout.map(|w| w.graph.median_us),
            "eager_with_layout_us": with_layout.map(|w| w.eager.median_us),
            "layout_added_us": added_us,
            "graph_with_two_calls_us": two_calls.map(|w| w.graph.median_us),
            "two_calls_added_us": two_calls_added_us,
            "layout_graph_us": layout_us,
        }));
    }
    if let Some(path) = &args.json {
        let document = json!({
            "unit": "us",
            "results": results,
            "meta": {
                "hidden_size": h,
                "num_experts": e,
                "routing": spec.to_string(),
                "weight_dtype": "bf16",
                "device": args.backend.device,
                "multiprocessors": backend.multiprocessors(),
                "copy_bandwidth_bytes_per_s": bandwidth,
                "target_seconds": args.min_seconds,
                "layout_block_size": args.block_size,
                "layout_calls_per_replay": sluice_backend_cuda::timing::LAYOUT_CALLS,
                "method": "route_into on a stream; S distinct (hidden, weight, bias) sets totalling \
                           3x L2; a pass routes each once; graph = one pass captured and replayed; \
                           median over repetitions of a pass, device events, divided by S; \
                           with --dispatch, each gate call as one route_and_dispatch_into \
                           (graph_with_layout_us; layout_added_us is its difference to graph_us), \
                           and as route_into followed by dispatch_into of its ids \
                           (graph_with_two_calls_us, two_calls_added_us), \
                           and layout_graph_us: a graph of layout_calls_per_replay dispatch_into \
                           calls on one routing's ids, replayed, divided by that count",
            },
        });
        let text = serde_json::to_string_pretty(&document)
            .map_err(|e| CliError::Input(format!("cannot encode the results: {e}")))?;
        io::write_atomically(path, text.as_bytes())?;
    }
    Ok(())
}
