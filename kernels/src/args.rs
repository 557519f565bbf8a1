//! The kernels' arguments, packed in the order and C types of their signatures in `gpu/`.
//!
//! CUDA's `cuLaunchKernel` and HIP's `hipModuleLaunchKernel` take the arguments the same way: an
//! array of pointers, one per parameter, each to a value of the parameter's type. Both backends
//! build that array here, so the order of a kernel's parameters is written down once on the host
//! side, next to the source it mirrors.

use std::ffi::c_void;

use crate::dispatch::DispatchArgs;
use crate::geometry::{GemmKernel, GemmPlan};
use crate::operands::DeviceMatrix;

/// One kernel parameter, as its C type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// A device pointer (`T*`), as a 64-bit address; 0 is `nullptr`.
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

/// The most parameters any kernel of the source has.
pub const MAX_KERNEL_ARGS: usize = 18;

/// The parameters of one launch, in signature order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelArgs {
    values: [KernelArg; MAX_KERNEL_ARGS],
    len: usize,
}

impl KernelArgs {
    fn new(values: &[KernelArg]) -> Self {
        let mut all = [KernelArg::Ptr(0); MAX_KERNEL_ARGS];
        all[..values.len()].copy_from_slice(values);
        KernelArgs { values: all, len: values.len() }
    }

    /// The values, in order.
    pub fn values(&self) -> &[KernelArg] {
        &self.values[..self.len]
    }

    /// The pointer array a launch takes: element `i` points at parameter `i`'s value, inside
    /// `self`, so the array is valid only while `self` is neither moved nor dropped. Entries past
    /// the kernel's parameters are null; launches read only as many as the kernel has.
    pub fn pointers(&mut self) -> [*mut c_void; MAX_KERNEL_ARGS] {
        let len = self.len;
        let mut index = 0;
        self.values.each_mut().map(|arg| {
            index += 1;
            if index > len {
                return std::ptr::null_mut();
            }
            match arg {
                KernelArg::Ptr(v) => std::ptr::from_mut(v).cast(),
                KernelArg::I32(v) => std::ptr::from_mut(v).cast(),
                KernelArg::I64(v) => std::ptr::from_mut(v).cast(),
                KernelArg::F32(v) => std::ptr::from_mut(v).cast(),
            }
        })
    }
}

/// Partial sums of the logits: `splits` slices of `[T, E]` f32 (`split_stride` elements apart,
/// rows `row_stride` apart); with one split, the logits themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partials {
    /// Device address of the first slice.
    pub ptr: u64,
    /// Slices.
    pub splits: usize,
    /// Elements between slices.
    pub split_stride: usize,
    /// Elements between rows of a slice.
    pub row_stride: usize,
}

/// Where the routing results go: device addresses with row strides in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingTargets {
    /// i32 `[T, K]`.
    pub ids: u64,
    /// Elements between rows of `ids`.
    pub ids_row_stride: usize,
    /// f32 `[T, K]`.
    pub weights: u64,
    /// Elements between rows of `weights`.
    pub weights_row_stride: usize,
    /// f32 `[T, E]` and its row stride, if the caller wants the logits.
    pub logits: Option<(u64, usize)>,
    /// i32 `[2]`: non-finite rows and the first of them (or -1).
    pub status: Option<u64>,
}

/// What a hash-routed call reads besides the logits: the table `tid2eid` and the token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashInputs {
    /// i32 `[vocab, K]`, contiguous, every row `K` distinct experts of `[0, E)`.
    pub table: u64,
    /// `vocab`: the rows of the table (checked to fit `int` when the table was prepared).
    pub table_rows: usize,
    /// `[T]` token ids, contiguous.
    pub token_ids: u64,
    /// Bytes per token id: 4 (i32) or 8 (i64).
    pub token_id_bytes: usize,
}

/// Sizes and strides become the kernels' `int` and `long long`. Every value packed here was
/// checked to fit: sizes by the planner (`i32`), strides by the bridge (a view's extent fits
/// `isize`), so the casts are exact.
fn int(value: usize) -> KernelArg {
    KernelArg::I32(value as i32)
}

fn long(value: usize) -> KernelArg {
    KernelArg::I64(value as i64)
}

/// What a gate call's routing counts into, which the kernel before it resets (the GEMM, or
/// `sluice_reset_status` before a GEMM not of ours), after waiting for the kernel before that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteCounters {
    /// i32 `[2]`, reset to `[0, -1]`: rows marked invalid, and the first of them.
    pub status: Option<u64>,
    /// u32 `[1]`, reset to 0: the fused layout's count of routing blocks that have finished.
    pub ticket: Option<u64>,
}

impl RouteCounters {
    /// Whether there is anything to reset.
    pub fn any(&self) -> bool {
        self.status.is_some() || self.ticket.is_some()
    }
}

/// The arguments of the GEMM kernel `plan` names: `hidden` by `weight` into `partials`, and the
/// reset of `counters`.
pub fn gemm_args(
    plan: &GemmPlan,
    hidden: &DeviceMatrix,
    weight: &DeviceMatrix,
    partials: &Partials,
    counters: RouteCounters,
) -> KernelArgs {
    use KernelArg::Ptr;
    let (status, ticket) = (Ptr(counters.status.unwrap_or(0)), Ptr(counters.ticket.unwrap_or(0)));
    let (tokens, hidden_size, experts) = (int(hidden.rows), int(hidden.cols), int(weight.rows));
    match plan.kernel {
        // One split: the logits themselves, no split stride.
        GemmKernel::Gemv { .. } => KernelArgs::new(&[
            Ptr(hidden.ptr),
            long(hidden.row_stride),
            Ptr(weight.ptr),
            long(weight.row_stride),
            tokens,
            hidden_size,
            experts,
            Ptr(partials.ptr),
            long(partials.row_stride),
            status,
            ticket,
        ]),
        // The parameters after its two tensor maps (`WarpgroupArgs` puts them first).
        GemmKernel::Warpgroup => KernelArgs::new(&[
            tokens,
            hidden_size,
            experts,
            int(plan.k_per_warp),
            int(plan.token_rows(hidden.rows)),
            Ptr(partials.ptr),
            long(partials.split_stride),
            long(partials.row_stride),
            status,
            ticket,
        ]),
        // Both take their k range (per warp, per split).
        GemmKernel::Mma { .. } | GemmKernel::Tiles => KernelArgs::new(&[
            Ptr(hidden.ptr),
            long(hidden.row_stride),
            Ptr(weight.ptr),
            long(weight.row_stride),
            tokens,
            hidden_size,
            experts,
            int(plan.k_per_warp),
            Ptr(partials.ptr),
            long(partials.split_stride),
            long(partials.row_stride),
            status,
            ticket,
        ]),
        GemmKernel::Simt { .. } => KernelArgs::new(&[
            Ptr(hidden.ptr),
            long(hidden.row_stride),
            long(hidden.col_stride),
            Ptr(weight.ptr),
            long(weight.row_stride),
            long(weight.col_stride),
            tokens,
            hidden_size,
            experts,
            Ptr(partials.ptr),
            long(partials.row_stride),
            status,
            ticket,
        ]),
    }
}

/// The arguments of `sluice_route` and `sluice_route_logits` (one signature): `tokens` rows of
/// `partials` (plus `bias`), scaled by `scale`, into `targets`; `hash` for a hash-routed config
/// (null pointers otherwise, which such kernels never read).
pub fn route_args(
    partials: &Partials,
    bias: Option<u64>,
    tokens: usize,
    scale: f32,
    targets: &RoutingTargets,
    hash: Option<&HashInputs>,
) -> KernelArgs {
    use KernelArg::Ptr;
    let (logits, logits_row) = targets.logits.unwrap_or((0, 0));
    let hash = hash.copied().unwrap_or(HashInputs {
        table: 0,
        table_rows: 0,
        token_ids: 0,
        token_id_bytes: 0,
    });
    KernelArgs::new(&[
        Ptr(partials.ptr),
        int(partials.splits),
        long(partials.split_stride),
        long(partials.row_stride),
        Ptr(bias.unwrap_or(0)),
        int(tokens),
        KernelArg::F32(scale),
        Ptr(targets.ids),
        long(targets.ids_row_stride),
        Ptr(targets.weights),
        long(targets.weights_row_stride),
        Ptr(logits),
        long(logits_row),
        Ptr(targets.status.unwrap_or(0)),
        Ptr(hash.table),
        int(hash.table_rows),
        Ptr(hash.token_ids),
        int(hash.token_id_bytes),
    ])
}

/// The arguments of `sluice_reset_status`: the counters to reset for a call of `tokens` rows.
pub fn reset_status_args(counters: RouteCounters, tokens: usize) -> KernelArgs {
    let (status, ticket) = (counters.status.unwrap_or(0), counters.ticket.unwrap_or(0));
    KernelArgs::new(&[KernelArg::Ptr(status), KernelArg::Ptr(ticket), int(tokens)])
}

/// The parameters of the fused kernels (`sluice_route_block_dispatch`, `_logits`): the routing
/// kernels' ([`route_args`]), then the layout's argument by value and the ticket the GEMM reset;
/// and of `sluice_dispatch_words` after them, the last two.
#[derive(Debug, Clone, Copy)]
pub struct RouteDispatchArgs {
    route: KernelArgs,
    layout: DispatchArgs,
    ticket: u64,
}

impl RouteDispatchArgs {
    /// The routing arguments `route`, the layout's `layout` (filled by
    /// [`FusedLayout::fill`](crate::FusedLayout::fill)) and the ticket's address.
    pub fn new(route: KernelArgs, layout: DispatchArgs, ticket: u64) -> Self {
        RouteDispatchArgs { route, layout, ticket }
    }

    /// The pointer array a launch takes, valid while `self` is neither moved nor dropped (as
    /// [`KernelArgs::pointers`]).
    pub fn pointers(&mut self) -> [*mut c_void; MAX_KERNEL_ARGS + 2] {
        let route = self.route.pointers();
        let len = self.route.values().len();
        let mut all = [std::ptr::null_mut(); MAX_KERNEL_ARGS + 2];
        all[..len].copy_from_slice(&route[..len]);
        all[len] = std::ptr::from_mut(&mut self.layout).cast();
        all[len + 1] = std::ptr::from_mut(&mut self.ticket).cast();
        all
    }

    /// The pointer array of `sluice_dispatch_words` after the fused kernel (the layout's argument
    /// by value and the ticket, the counts after it), valid as [`pointers`](Self::pointers).
    pub fn layout_pointers(&mut self) -> [*mut c_void; 2] {
        [std::ptr::from_mut(&mut self.layout).cast(), std::ptr::from_mut(&mut self.ticket).cast()]
    }
}

/// A tensor map (`CUtensorMap`): the copy unit's description of a matrix in global memory, made by
/// the driver and passed to a kernel by value. Opaque here.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorMap(pub [u64; 16]);

/// The warpgroup kernel's operands as tensor maps: bf16, k innermost, boxes of
/// [`WG_K`](crate::WG_K) values by [`GemmPlan::token_rows`] rows (the hidden states) and by
/// [`WG_EXPERTS`](crate::WG_EXPERTS) rows (the weight), 128-byte swizzle, zero fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarpgroupMaps {
    /// The hidden states `[T, H]`.
    pub hidden: TensorMap,
    /// The weight `[E, H]`.
    pub weight: TensorMap,
}

/// The warpgroup kernel's arguments: its two tensor maps by value, then what [`gemm_args`] packs
/// for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarpgroupArgs {
    maps: WarpgroupMaps,
    rest: KernelArgs,
}

impl WarpgroupArgs {
    /// The maps `maps` before the arguments `rest` ([`gemm_args`] of a warpgroup plan).
    pub fn new(maps: WarpgroupMaps, rest: KernelArgs) -> Self {
        WarpgroupArgs { maps, rest }
    }

    /// The pointer array a launch takes, valid while `self` is neither moved nor dropped (as
    /// [`KernelArgs::pointers`]).
    pub fn pointers(&mut self) -> [*mut c_void; MAX_KERNEL_ARGS] {
        let rest = self.rest.pointers();
        let len = self.rest.values().len();
        let mut all = [std::ptr::null_mut(); MAX_KERNEL_ARGS];
        all[0] = std::ptr::from_mut(&mut self.maps.hidden).cast();
        all[1] = std::ptr::from_mut(&mut self.maps.weight).cast();
        all[2..len + 2].copy_from_slice(&rest[..len]);
        all
    }
}

/// The arguments of `sluice_sum_partials`: the contiguous slices of `partials` added into logits
/// `[tokens, experts]` at `logits` with row stride `logits_row_stride`.
pub fn sum_partials_args(
    partials: &Partials,
    tokens: usize,
    experts: usize,
    logits: u64,
    logits_row_stride: usize,
) -> KernelArgs {
    KernelArgs::new(&[
        KernelArg::Ptr(partials.ptr),
        int(partials.splits),
        int(tokens),
        int(experts),
        KernelArg::Ptr(logits),
        long(logits_row_stride),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{HiddenKind, Launch, WeightKind};
    use sluice_tensor::DType;

    /// The parameter list of the first `void name(` after `from` in the device source, as C
    /// types (`ptr`, `int`, `long`, `float`).
    fn signature(from: &str, name: &str) -> Vec<&'static str> {
        let source = crate::SOURCE;
        let after = source.find(from).unwrap_or_else(|| panic!("{from} not in the source"));
        let start = after
            + source[after..]
                .find(&format!("void {name}("))
                .unwrap_or_else(|| panic!("{name} not after {from}"));
        let open = start + source[start..].find('(').unwrap();
        let close = open + source[open..].find(')').unwrap();
        source[open + 1..close]
            .split(',')
            .map(|param| {
                let param = param.replace('\\', " ");
                let words: Vec<&str> = param.split_whitespace().collect();
                match words.iter().rev().nth(1).copied() {
                    _ if param.contains('*') => "ptr",
                    Some("int") => "int",
                    Some("long") => "long",
                    Some("float") => "float",
                    Some("sluice_dispatch_args") => "layout",
                    Some("sluice_tensor_map") => "map",
                    other => panic!("{name}: parameter {param:?} of type {other:?}"),
                }
            })
            .collect()
    }

    fn kinds(args: &KernelArgs) -> Vec<&'static str> {
        args.values()
            .iter()
            .map(|arg| match arg {
                KernelArg::Ptr(_) => "ptr",
                KernelArg::I32(_) => "int",
                KernelArg::I64(_) => "long",
                KernelArg::F32(_) => "float",
            })
            .collect()
    }

    const PLAN_LAUNCH: Launch = Launch { grid: [1, 1, 1], block: [32, 1, 1], shared_bytes: 0 };
    const M: DeviceMatrix = DeviceMatrix {
        ptr: 64,
        rows: 3,
        cols: 16,
        row_stride: 16,
        col_stride: 1,
        dtype: DType::BF16,
    };
    const P: Partials = Partials { ptr: 128, splits: 2, split_stride: 48, row_stride: 16 };
    const COUNTERS: RouteCounters = RouteCounters { status: Some(8), ticket: Some(24) };

    #[test]
    fn every_kernel_gets_its_parameters_in_the_order_and_types_of_the_source() {
        let simt = GemmPlan {
            kernel: GemmKernel::Simt { hidden: HiddenKind::Bf16, weight: WeightKind::F32 },
            launch: PLAN_LAUNCH,
            k_per_warp: 16,
            splits: 1,
        };
        // The GEMM kernels are stamped out by macros, whose `name` stands for each kernel.
        assert_eq!(
            kinds(&gemm_args(&simt, &M, &M, &P, RouteCounters::default())),
            signature("#define SLUICE_INSTANTIATE_SIMT", "name")
        );
        let mma =
            GemmPlan { kernel: GemmKernel::Mma { hidden: HiddenKind::F32, tiles: 2 }, ..simt };
        assert_eq!(
            kinds(&gemm_args(&mma, &M, &M, &P, COUNTERS)),
            signature("#define SLUICE_INSTANTIATE_MMA", "name")
        );
        let tiles = GemmPlan { kernel: GemmKernel::Tiles, ..simt };
        assert_eq!(
            kinds(&gemm_args(&tiles, &M, &M, &P, COUNTERS)),
            signature("#define SLUICE_INSTANTIATE_TILES", "name")
        );
        // The warpgroup kernel: two tensor maps, then the rest.
        let warpgroup = GemmPlan { kernel: GemmKernel::Warpgroup, ..simt };
        let rest = gemm_args(&warpgroup, &M, &M, &P, COUNTERS);
        let mut expected = vec!["map", "map"];
        expected.extend(kinds(&rest));
        assert_eq!(expected, signature("", "sluice_gemm_warpgroup"));
        assert_eq!(rest.values()[4], KernelArg::I32(8), "boxes of 3 tokens rounded up to 8 rows");
        let maps = WarpgroupMaps { hidden: TensorMap([1; 16]), weight: TensorMap([2; 16]) };
        let mut args = WarpgroupArgs::new(maps, rest);
        let pointers = args.pointers();
        // SAFETY: `args` is alive and unmoved; the first two pointers were made from the maps,
        // the third from the tokens (an `int`).
        let (hidden, weight, tokens) = unsafe {
            (
                (*pointers[0].cast::<TensorMap>()).0[0],
                (*pointers[1].cast::<TensorMap>()).0[15],
                *pointers[2].cast::<i32>(),
            )
        };
        assert_eq!((hidden, weight, tokens), (1, 2, 3));
        assert!(pointers[2 + rest.values().len()..].iter().all(|p| p.is_null()));
        let targets = RoutingTargets {
            ids: 1,
            ids_row_stride: 8,
            weights: 2,
            weights_row_stride: 8,
            logits: None,
            status: None,
        };
        let gemv = GemmPlan {
            kernel: GemmKernel::Gemv { tokens_per_block: 2, experts_per_block: 1 },
            splits: 1,
            ..simt
        };
        assert_eq!(
            kinds(&gemm_args(&gemv, &M, &M, &P, COUNTERS)),
            signature("#define SLUICE_INSTANTIATE_GEMV", "name")
        );
        let route = signature("#define SLUICE_INSTANTIATE_ROUTE(", "name");
        assert_eq!(kinds(&route_args(&P, None, 3, 2.5, &targets, None)), route);
        // The block-per-token kernels take the same arguments.
        assert_eq!(signature("#define SLUICE_INSTANTIATE_ROUTE_BLOCK(", "name"), route);
        let hash = HashInputs { table: 16, table_rows: 7, token_ids: 32, token_id_bytes: 8 };
        let hashed = route_args(&P, None, 3, 2.5, &targets, Some(&hash));
        assert_eq!(kinds(&hashed), route);
        assert_eq!(
            hashed.values()[14..],
            [KernelArg::Ptr(16), KernelArg::I32(7), KernelArg::Ptr(32), KernelArg::I32(8)]
        );
        assert_eq!(kinds(&reset_status_args(COUNTERS, 3)), signature("", "sluice_reset_status"));
        // The fused kernels: the routing kernels' arguments, then the layout's and the ticket.
        let fused = signature("#define SLUICE_INSTANTIATE_ROUTE_DISPATCH(", "name");
        let mut expected = route.clone();
        expected.extend(["layout", "ptr"]);
        assert_eq!(fused, expected);
        let mut args = RouteDispatchArgs::new(
            route_args(&P, None, 3, 2.5, &targets, None),
            DispatchArgs { tokens: 3, ..DispatchArgs::default() },
            40,
        );
        let pointers = args.pointers();
        let (route_len, last) = (route.len(), MAX_KERNEL_ARGS + 1);
        // SAFETY: `args` is alive and unmoved; the pointers past the routing ones were made from
        // the layout's argument and the ticket.
        let (layout_tokens, ticket) = unsafe {
            (
                (*pointers[route_len].cast::<DispatchArgs>()).tokens,
                *pointers[route_len + 1].cast::<u64>(),
            )
        };
        assert_eq!((layout_tokens, ticket), (3, 40));
        assert_eq!(route_len + 2, last + 1, "the fused kernels take the most parameters");
        assert_eq!(
            kinds(&sum_partials_args(&P, 3, 16, 256, 16)),
            signature("", "sluice_sum_partials")
        );
    }

    #[test]
    fn the_pointers_point_at_the_values() {
        let mut args = sum_partials_args(&P, 3, 16, 256, 20);
        let pointers = args.pointers();
        // SAFETY: `args` is alive and unmoved; each pointer was made from the value of its kind.
        let (first, splits, row) = unsafe {
            (*pointers[0].cast::<u64>(), *pointers[1].cast::<i32>(), *pointers[5].cast::<i64>())
        };
        assert_eq!((first, splits, row), (128, 2, 20));
        assert!(pointers[6..].iter().all(|p| p.is_null()), "nothing past the kernel's parameters");
    }
}
