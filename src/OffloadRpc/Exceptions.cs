namespace OffloadRpc;

/// <summary>The base of every exception OffloadRpc throws for a transport or protocol condition.</summary>
public class OffloadRpcException : Exception
{
    public OffloadRpcException(string message) : base(message) { }

    public OffloadRpcException(string message, Exception? innerException) : base(message, innerException) { }
}

/// <summary>
/// The peer process closed the connection or died. Every call pending on the connection, and every
/// call made after, fails with this exception.
/// </summary>
public sealed class PeerDisconnectedException : OffloadRpcException
{
    public PeerDisconnectedException(string message) : base(message) { }

    public PeerDisconnectedException(string message, Exception? innerException) : base(message, innerException) { }
}

/// <summary>
/// The peer broke the protocol: a ring slot, offset, length, id or handshake field it wrote was invalid.
/// The connection is closed when this is raised; nothing outside the connection's mappings was touched.
/// </summary>
public sealed class ProtocolViolationException : OffloadRpcException
{
    public ProtocolViolationException(string message) : base(message) { }

    public ProtocolViolationException(string message, Exception? innerException) : base(message, innerException) { }
}

/// <summary>
/// The two sides disagree on the protocol version or on a service contract (the client was built
/// against another version of the interface). Raised at connect time, never as a wrong dispatch.
/// </summary>
public sealed class ContractMismatchException : OffloadRpcException
{
    public ContractMismatchException(string message) : base(message) { }

    public ContractMismatchException(string message, Exception? innerException) : base(message, innerException) { }

    /// <summary>The service whose contract differs, when the mismatch is about one service.</summary>
    public string? ServiceName { get; init; }
}

/// <summary>
/// A payload could not be placed in the connection's shared-memory arena: it is larger than the
/// arena may ever grow, or no space was released within the configured wait.
/// </summary>
public sealed class ArenaExhaustedException : OffloadRpcException
{
    public ArenaExhaustedException(string message) : base(message) { }
}

/// <summary>The remote implementation threw; carries the remote exception's type, message and stack.</summary>
public sealed class RemoteInvocationException : OffloadRpcException
{
    public RemoteInvocationException(string remoteExceptionType, string message, string? remoteStackTrace)
        : base($"{remoteExceptionType}: {message}")
    {
        RemoteExceptionType = remoteExceptionType;
        RemoteMessage = message;
        RemoteStackTrace = remoteStackTrace;
    }

    /// <summary>The full name of the exception type thrown in the remote process.</summary>
    public string RemoteExceptionType { get; }

    /// <summary>The remote exception's message.</summary>
    public string RemoteMessage { get; }

    /// <summary>The remote exception's stack trace, as text.</summary>
    public string? RemoteStackTrace { get; }

    public override string ToString() =>
        RemoteStackTrace is null ? base.ToString() : base.ToString() + Environment.NewLine + "--- remote stack trace ---" + Environment.NewLine + RemoteStackTrace;
}

/// <summary>
/// A call did not complete before its deadline (<see cref="OffloadCallScope.WithDeadline(TimeSpan)"/> or
/// <see cref="OffloadRpcOptions.DefaultDeadline"/>). The server's token for the call fired at the same
/// deadline. A <see cref="TimeoutException"/>, as gRPC's DeadlineExceeded is a timeout.
/// </summary>
public sealed class DeadlineExceededException : TimeoutException
{
    public DeadlineExceededException(string message) : base(message) { }

    public DeadlineExceededException(string message, Exception? innerException) : base(message, innerException) { }

    /// <summary>The call's deadline (UTC).</summary>
    public DateTime Deadline { get; init; }

    /// <summary>The method called, as /Service/Method.</summary>
    public string? Method { get; init; }
}
