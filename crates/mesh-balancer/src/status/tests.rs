use super::*;

#[test]
fn an_inner_status_passes_through_as_it_is() {
    let inner = Status::resource_exhausted("rate limit exceeded");
    let status = of_error(Box::new(inner), "endpoint a");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), "rate limit exceeded");
}

#[test]
fn a_timeout_is_deadline_exceeded_and_a_connect_error_unavailable() {
    let status = of_error(Box::new(tonic::TimeoutExpired(())), "endpoint a");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    let refused = tonic::ConnectError(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
    let status = of_error(Box::new(refused), "endpoint a (127.0.0.1:1)");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().starts_with("endpoint a (127.0.0.1:1): "), "{}", status.message());
}

#[test]
fn an_unknown_error_is_unknown_with_its_chain() {
    let status = of_error("boom".into(), "endpoint a");
    assert_eq!(status.code(), Code::Unknown);
    assert_eq!(status.message(), "endpoint a: boom");
}

#[test]
fn a_socket_that_broke_under_the_call_is_unavailable() {
    for kind in [std::io::ErrorKind::ConnectionReset, std::io::ErrorKind::BrokenPipe, std::io::ErrorKind::UnexpectedEof]
    {
        let status = of_error(Box::new(std::io::Error::new(kind, "connection reset")), "endpoint a");
        assert_eq!(status.code(), Code::Unavailable, "{kind:?}");
    }
}

#[test]
fn only_the_endpoints_own_failures_count_against_it() {
    assert!(counts_against_endpoint(Code::Unavailable));
    assert!(counts_against_endpoint(Code::Internal));
    assert!(counts_against_endpoint(Code::DeadlineExceeded));
    assert!(!counts_against_endpoint(Code::Cancelled));
    assert!(!counts_against_endpoint(Code::Ok));
}
