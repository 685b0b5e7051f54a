//! What a transport error says about the server a call was sent to.

/// Whether `error` (or one of its sources) says the server never took the call, so that the
/// call tells nothing of the server's health: hyper dropped it queued on a connection that
/// closed before sending it, or the server refused it with GOAWAY(NO_ERROR) while closing
/// the connection gracefully (a maximum connection age, a rolling restart). Either may be
/// retried; neither is the server failing, and counting them ejected healthy servers whose
/// connections aged out.
///
/// ```
/// let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
/// assert!(!mesh_util::transport::never_taken(&refused));
/// assert!(!mesh_util::transport::never_taken(&std::io::Error::other("connection reset")));
/// ```
pub fn never_taken(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && h.is_canceled()
        {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.is_go_away()
            && h2.is_remote()
            && h2.reason() == Some(h2::Reason::NO_ERROR)
        {
            return true;
        }
        next = e.source();
    }
    false
}
