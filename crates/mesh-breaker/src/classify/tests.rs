use http::{HeaderMap, StatusCode};
use tonic::Code;

use super::*;

fn grpc_status(code: Code) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", (code as i32).to_string().parse().expect("header"));
    h
}

#[test]
fn a_trailers_only_error_is_judged_from_the_headers() {
    let c = GrpcClassifier::default();
    assert_eq!(c.classify_head(StatusCode::OK, &grpc_status(Code::Unavailable)), Some(Outcome::Failure));
    assert_eq!(c.classify_head(StatusCode::OK, &grpc_status(Code::ResourceExhausted)), Some(Outcome::Ignored));
    assert_eq!(c.classify_head(StatusCode::OK, &grpc_status(Code::InvalidArgument)), Some(Outcome::Ignored));
}

#[test]
fn a_response_with_messages_is_judged_by_its_trailers() {
    let c = GrpcClassifier::default();
    assert_eq!(c.classify_head(StatusCode::OK, &HeaderMap::new()), None, "the head does not decide");
    assert_eq!(c.classify_end(Some(&grpc_status(Code::Ok))), Outcome::Success);
    assert_eq!(c.classify_end(Some(&grpc_status(Code::Internal))), Outcome::Failure);
    assert_eq!(c.classify_end(Some(&grpc_status(Code::DataLoss))), Outcome::Failure);
    assert_eq!(c.classify_end(None), Outcome::Failure, "a body that ends with no status is UNKNOWN");
}

#[test]
fn the_default_codes_are_the_five_that_say_the_endpoint_is_in_trouble() {
    let c = GrpcClassifier::default();
    let failing: Vec<Code> = (0..=16).map(Code::from_i32).filter(|code| c.is_failure(*code)).collect();
    assert_eq!(failing, [Code::Unknown, Code::DeadlineExceeded, Code::Internal, Code::Unavailable, Code::DataLoss],);
    assert_eq!(c.outcome(Code::Cancelled), Outcome::Ignored);
    assert_eq!(c.outcome(Code::ResourceExhausted), Outcome::Ignored);
    assert_eq!(c.outcome(Code::Ok), Outcome::Success);
}

#[test]
fn the_codes_that_count_are_configurable() {
    let c = GrpcClassifier::with_failure_codes(&[Code::ResourceExhausted, Code::Ok]);
    assert_eq!(c.outcome(Code::ResourceExhausted), Outcome::Failure);
    assert_eq!(c.outcome(Code::Unavailable), Outcome::Ignored);
    assert_eq!(c.outcome(Code::Ok), Outcome::Success, "OK is never a failure");
}

#[test]
fn http_errors_without_a_grpc_status_map_as_the_spec_says() {
    let c = GrpcClassifier::default();
    for (status, outcome) in [
        (StatusCode::SERVICE_UNAVAILABLE, Outcome::Failure),
        (StatusCode::BAD_GATEWAY, Outcome::Failure),
        (StatusCode::TOO_MANY_REQUESTS, Outcome::Failure),
        (StatusCode::BAD_REQUEST, Outcome::Failure),
        (StatusCode::NOT_FOUND, Outcome::Ignored),
        (StatusCode::UNAUTHORIZED, Outcome::Ignored),
        (StatusCode::IM_A_TEAPOT, Outcome::Failure),
    ] {
        assert_eq!(c.classify_head(status, &HeaderMap::new()), Some(outcome), "{status}");
    }
}

#[test]
fn transport_errors_fail_and_statuses_inside_errors_are_read() {
    let c = GrpcClassifier::default();
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
    assert_eq!(c.classify_error(&refused), Outcome::Failure);
    assert_eq!(c.classify_error(&tonic::Status::resource_exhausted("slow down")), Outcome::Ignored);
    assert_eq!(c.classify_error(&tonic::Status::cancelled("caller went away")), Outcome::Ignored);
    assert_eq!(c.classify_error(&tonic::TimeoutExpired(())), Outcome::Failure);
}
