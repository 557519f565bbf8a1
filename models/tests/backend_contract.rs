//! What a backend returns is checked at the models boundary: a hand-written router that returns
//! out-of-range or repeated ids, non-finite weights or stray invalid marks is refused, naming the
//! backend and the row, through `route` and through `route_into`.

use std::fmt;

use sluice_models::{ModelError, PreparedGate, RoutingProblem};
use sluice_tensor::{
    BackendError, Dlpack, DlpackView, DlpackViewMut, Execution, NonFinitePolicy, PreparedRouter,
    RouteInputs, RouteOutputs, RoutingOutput, RoutingSpec, Tensor,
};

const EXPERTS: usize = 32;
const HIDDEN: usize = 4;

/// A router written outside the workspace that returns fixed rows, right or wrong.
struct FixedRows {
    spec: RoutingSpec,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

impl fmt::Debug for FixedRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FixedRows({:?})", self.ids)
    }
}

impl PreparedRouter for FixedRows {
    fn spec(&self) -> &RoutingSpec {
        &self.spec
    }

    fn hidden_size(&self) -> usize {
        HIDDEN
    }

    fn router_gemm(&self, _: &Dlpack) -> Result<Dlpack, BackendError> {
        Err(BackendError::Device { backend: "fixed", message: "no logits".to_owned() })
    }

    fn route(&self, _: &Dlpack) -> Result<RoutingOutput, BackendError> {
        let tokens = self.ids.len() / self.spec.top_k;
        RoutingOutput::from_host_vecs(
            tokens,
            self.spec.top_k,
            self.ids.clone(),
            self.weights.clone(),
        )
        .map_err(|source| BackendError::Argument { op: "route", arg: "topk_ids", source })
    }
}

fn gate(ids: &[i32], weights: &[f32], policy: NonFinitePolicy) -> PreparedGate {
    let spec = RoutingSpec::builder(EXPERTS, 2).non_finite(policy).build().unwrap();
    let router = FixedRows { spec, ids: ids.to_vec(), weights: weights.to_vec() };
    PreparedGate::from_router(5, "hand-written", Box::new(router))
}

/// Routes two tokens both ways; both must agree.
fn route_both(gate: &PreparedGate) -> Result<(), ModelError> {
    let hidden = vec![0.5f32; 2 * HIDDEN];
    let allocated = gate.route(&Tensor::from_slice(&hidden, &[2, HIDDEN]).unwrap()).map(|_| ());
    let (mut ids, mut weights) = ([0i32; 4], [0f32; 4]);
    let inputs = RouteInputs::new(DlpackView::from_slice(&hidden, &[2, HIDDEN]).unwrap());
    let mut outputs = RouteOutputs::new(
        DlpackViewMut::from_slice(&mut ids, &[2, 2]).unwrap(),
        DlpackViewMut::from_slice(&mut weights, &[2, 2]).unwrap(),
    );
    let into = gate.route_into(&inputs, &mut outputs, Execution::Host);
    assert_eq!(allocated.is_ok(), into.is_ok(), "{allocated:?} vs {into:?}");
    into
}

fn problem(result: Result<(), ModelError>) -> (usize, RoutingProblem) {
    match result {
        Err(ModelError::InvalidRouting { backend, row, problem }) => {
            assert_eq!(backend, "hand-written");
            (row, problem)
        }
        other => panic!("expected an invalid routing, got {other:?}"),
    }
}

#[test]
fn a_correct_backend_passes() {
    route_both(&gate(&[3, 1, 0, 31], &[0.6, 0.4, 0.9, 0.1], NonFinitePolicy::Error)).unwrap();
    let marked = [-1, -1, 0, 31];
    route_both(&gate(&marked, &[0.0, 0.0, 0.9, 0.1], NonFinitePolicy::MarkInvalid)).unwrap();
}

#[test]
fn out_of_range_ids_are_refused() {
    let bad = gate(&[3, 1, 999, 0], &[0.6, 0.4, 0.9, 0.1], NonFinitePolicy::Error);
    assert_eq!(
        problem(route_both(&bad)),
        (1, RoutingProblem::IdOutOfRange { id: 999, experts: 32 })
    );
    let negative = gate(&[-5, 1, 0, 2], &[0.6, 0.4, 0.9, 0.1], NonFinitePolicy::MarkInvalid);
    let expected = RoutingProblem::IdOutOfRange { id: -5, experts: 32 };
    assert_eq!(problem(route_both(&negative)), (0, expected));
}

#[test]
fn repeated_ids_and_non_finite_weights_are_refused() {
    let repeated = gate(&[3, 3, 0, 1], &[0.5, 0.5, 0.9, 0.1], NonFinitePolicy::Error);
    assert_eq!(problem(route_both(&repeated)), (0, RoutingProblem::RepeatedId { id: 3 }));
    let nan = gate(&[3, 1, 0, 1], &[0.5, 0.5, f32::NAN, 0.1], NonFinitePolicy::Error);
    let (row, found) = problem(route_both(&nan));
    assert_eq!(row, 1);
    assert!(matches!(found, RoutingProblem::NonFiniteWeight { id: 0, value } if value.is_nan()));
}

#[test]
fn invalid_marks_are_refused_where_the_policy_allows_none() {
    let marked = [-1, -1, 0, 31];
    let under_error = gate(&marked, &[0.0, 0.0, 0.9, 0.1], NonFinitePolicy::Error);
    assert_eq!(problem(route_both(&under_error)), (0, RoutingProblem::UnexpectedInvalidMark));
    let half_marked = gate(&[-1, 4, 0, 31], &[0.0, 0.0, 0.9, 0.1], NonFinitePolicy::MarkInvalid);
    assert_eq!(problem(route_both(&half_marked)).1, RoutingProblem::UnexpectedInvalidMark);
    let weighted = gate(&marked, &[0.5, 0.0, 0.9, 0.1], NonFinitePolicy::MarkInvalid);
    let message = route_both(&weighted).unwrap_err().to_string();
    assert!(message.contains("hand-written") && message.contains("row 0"), "{message}");
}
