using OffloadRpc.Internal;

namespace OffloadRpc;

/// <summary>The value of a call whose method returns no result (<c>Task</c> or <c>ValueTask</c>), as an interceptor sees it.</summary>
public readonly struct NoResult
{
}

/// <summary>Continues a client call: the next interceptor, or the call itself. Call it at most once.</summary>
public delegate ValueTask<TResult> ClientCallContinuation<TResult>(ClientInterceptorContext context);

/// <summary>Continues a streamed client call: the next interceptor's stream, or the call's own. Call it at most once.</summary>
public delegate IAsyncEnumerable<TItem> ClientStreamContinuation<TItem>(ClientInterceptorContext context);

/// <summary>Continues a served call: the next interceptor, or the service method. Call it at most once.</summary>
public delegate ValueTask<TResult> ServerCallContinuation<TResult>(ServerInterceptorContext context);

/// <summary>Continues a served call whose result is a stream: the next interceptor's stream, or the method's own. Call it at most once.</summary>
public delegate IAsyncEnumerable<TItem> ServerStreamContinuation<TItem>(ServerInterceptorContext context);

/// <summary>
/// Runs around every call a connection makes, as gRPC's <c>Interceptor</c> does on the client: it sees
/// the service and method, the headers and deadline (and may change them), the arguments' sizes, and the
/// result or the exception. It may wrap the call (time it, retry nothing: the continuation runs at
/// most once), or short-circuit it by returning a result or throwing without calling the continuation.
/// <see cref="InterceptAsync"/> sees calls with one result (<c>AsyncUnaryCall</c>, and a streamed argument's
/// calls: <c>AsyncClientStreamingCall</c>); methods without a result have <c>TResult</c> <see cref="NoResult"/>.
/// <see cref="InterceptStream"/> sees calls whose result is a stream (<c>AsyncServerStreamingCall</c>, and
/// with a streamed argument <c>AsyncDuplexStreamingCall</c>). Added through
/// <see cref="OffloadRpcOptions.ClientInterceptors"/> (first added runs outermost), or from DI under hosting.
/// </summary>
public abstract class ClientInterceptor
{
    /// <summary>Intercepts one call; the default calls <paramref name="continuation"/>.</summary>
    public virtual ValueTask<TResult> InterceptAsync<TResult>(ClientInterceptorContext context, ClientCallContinuation<TResult> continuation)
    {
        ArgumentNullException.ThrowIfNull(continuation);
        return continuation(context);
    }

    /// <summary>
    /// Intercepts one call whose result is a stream, when its enumeration starts (nothing is sent before).
    /// Change the headers or deadline, then return <paramref name="continuation"/>'s stream, a stream
    /// around it (to see or change each item, or the exception that ends it), or a stream of your own
    /// without calling it (the call is never sent). The default returns <paramref name="continuation"/>'s stream.
    /// </summary>
    public virtual IAsyncEnumerable<TItem> InterceptStream<TItem>(ClientInterceptorContext context, ClientStreamContinuation<TItem> continuation)
    {
        ArgumentNullException.ThrowIfNull(continuation);
        return continuation(context);
    }
}

/// <summary>
/// Runs around every call a server serves, as gRPC's server-side <c>Interceptor</c>: it sees the service and
/// method, the request headers and deadline, the caller, the arguments' sizes, and the method's typed result
/// or exception. It may wrap the method, or short-circuit it: returning a result without calling the
/// continuation answers the caller with that result (a cache, say); throwing answers it with the exception
/// (a <see cref="RemoteInvocationException"/> there). <see cref="InterceptAsync"/> is gRPC's
/// <c>UnaryServerHandler</c> (and <c>ClientStreamingServerHandler</c>: the method's streamed argument is read by
/// the method); methods without a result have <c>TResult</c> <see cref="NoResult"/>. <see cref="InterceptStream"/>
/// is <c>ServerStreamingServerHandler</c> (and <c>DuplexStreamingServerHandler</c>).
/// <see cref="OffloadCallContext.Current"/> is set while it runs. Added through
/// <see cref="OffloadRpcOptions.ServerInterceptors"/> (first added runs outermost), or from DI under hosting.
/// </summary>
public abstract class ServerInterceptor
{
    /// <summary>Intercepts one served call; the default calls <paramref name="continuation"/>.</summary>
    public virtual ValueTask<TResult> InterceptAsync<TResult>(ServerInterceptorContext context, ServerCallContinuation<TResult> continuation)
    {
        ArgumentNullException.ThrowIfNull(continuation);
        return continuation(context);
    }

    /// <summary>
    /// Intercepts one served call whose result is a stream: return <paramref name="continuation"/>'s stream
    /// (the method's), a stream around it (to see or change each item before it is sent, or the exception
    /// that ends it), or a stream of your own without calling it (the method never runs). The caller's
    /// window applies to whatever stream is returned. The default returns <paramref name="continuation"/>'s stream.
    /// </summary>
    public virtual IAsyncEnumerable<TItem> InterceptStream<TItem>(ServerInterceptorContext context, ServerStreamContinuation<TItem> continuation)
    {
        ArgumentNullException.ThrowIfNull(continuation);
        return continuation(context);
    }
}

/// <summary>One outgoing call as a <see cref="ClientInterceptor"/> sees it.</summary>
public sealed class ClientInterceptorContext
{
    private readonly MethodDescriptor _method;
    private MessageBuilder? _request;
    private Dictionary<string, string>? _headers;
    private readonly IReadOnlyDictionary<string, string>? _scopeHeaders;

    internal ClientInterceptorContext(CallInvoker invoker, MethodDescriptor method, MessageBuilder request, OffloadCallScope? scope, DateTime? deadline, CancellationToken cancellationToken)
    {
        Invoker = invoker;
        _method = method;
        _request = request;
        CancellationToken = cancellationToken;
        Deadline = deadline;
        if (scope is { Headers.Count: > 0 })
        {
            _scopeHeaders = scope.Headers; // copied only when an interceptor asks for the headers it may change
        }

        RequestBodyBytes = request.WrittenBody.Length;
        foreach (Transport.OutboundPayload payload in request.Payloads)
        {
            RequestPayloadBytes += payload.Length;
        }

        RequestPayloadCount = request.Payloads.Length;
    }

    /// <summary>The invoker the call goes through.</summary>
    internal CallInvoker Invoker { get; }

    /// <summary>The method called.</summary>
    internal MethodDescriptor Method => _method;

    /// <summary>The service interface's full name (<c>rpc.service</c>).</summary>
    public string ServiceName => _method.ServiceName;

    /// <summary>The method's name (<c>rpc.method</c>).</summary>
    public string MethodName => _method.Name;

    /// <summary><c>/ServiceName/MethodName</c>.</summary>
    public string FullName => _method.FullName;

    /// <summary>The headers the call carries (from the open <see cref="OffloadCallScope"/>); add or change some here.</summary>
    public IDictionary<string, string> RequestHeaders => _headers ??= _scopeHeaders is null
        ? new Dictionary<string, string>(StringComparer.Ordinal)
        : new Dictionary<string, string>(_scopeHeaders, StringComparer.Ordinal);

    /// <summary>The headers to send: this call's own copy once an interceptor asked for it, the scope's otherwise; null when none.</summary>
    internal IReadOnlyDictionary<string, string>? HeadersOrNull => _headers is null ? _scopeHeaders : _headers.Count > 0 ? _headers : null;

    /// <summary>
    /// The call's deadline (UTC; from the scope or <see cref="OffloadRpcOptions.DefaultDeadline"/>), or null; may
    /// be changed (a local time is converted to UTC, an unspecified one is read as UTC).
    /// </summary>
    public DateTime? Deadline
    {
        get => _deadline;
        set => _deadline = value is { } deadline ? Internal.CallMetadata.ToUtc(deadline) : null;
    }

    private DateTime? _deadline;

    /// <summary>The caller's token; may be replaced (a linked token, for instance).</summary>
    public CancellationToken CancellationToken { get; set; }

    /// <summary>Bytes of the MessagePack-encoded arguments.</summary>
    public int RequestBodyBytes { get; }

    /// <summary>Bytes of the buffer arguments (travelling through shared memory); stream arguments and streamed items are not counted.</summary>
    public long RequestPayloadBytes { get; }

    /// <summary>How many buffer arguments the call carries.</summary>
    public int RequestPayloadCount { get; }

    /// <summary>The request, taken once by the call itself.</summary>
    internal MessageBuilder TakeRequest() =>
        Interlocked.Exchange(ref _request, null) ?? throw new InvalidOperationException($"An interceptor continued the call {FullName} twice: a call's continuation runs at most once.");

    /// <summary>Gives the request (taken to connect first) back, for the transport of the moment to take.</summary>
    internal ClientInterceptorContext WithRequest(MessageBuilder request)
    {
        _request = request;
        return this;
    }

    /// <summary>The call never ran (an interceptor short-circuited it): its arguments' leases go back.</summary>
    internal void DiscardUnsentRequest() => Interlocked.Exchange(ref _request, null)?.Discard();
}

/// <summary>One served call as a <see cref="ServerInterceptor"/> sees it.</summary>
public sealed class ServerInterceptorContext
{
    private Dictionary<object, object?>? _items;

    internal ServerInterceptorContext(ServerCall call) => Call = call;

    internal ServerCall Call { get; }

    /// <summary>The service interface's full name (<c>rpc.service</c>).</summary>
    public string ServiceName => Call.Method.ServiceName;

    /// <summary>The method's name (<c>rpc.method</c>).</summary>
    public string MethodName => Call.Method.Name;

    /// <summary><c>/ServiceName/MethodName</c>.</summary>
    public string FullName => Call.Method.FullName;

    /// <summary>The headers the caller sent.</summary>
    public IReadOnlyDictionary<string, string> RequestHeaders => Call.RequestHeaders;

    /// <summary>The caller's deadline (UTC, as this process's clock sees it), or null. The call's token fires at it.</summary>
    public DateTime? Deadline => Call.Deadline;

    /// <summary>Fires when the caller cancels, disconnects, or the deadline passes.</summary>
    public CancellationToken CancellationToken => Call.CancellationToken;

    /// <summary>The calling process's id (from the kernel); -1 when the transport cannot verify it (gRPC over TCP). See <see cref="OffloadCallContext.PeerProcessId"/>.</summary>
    public int PeerProcessId => Call.Inbound.PeerProcessId;

    /// <summary>The calling process's user id (from the kernel); <see cref="uint.MaxValue"/> when the transport cannot verify it (gRPC over TCP).</summary>
    public uint PeerUserId => Call.Inbound.PeerUserId;

    /// <summary>True when the peer's ids come from the kernel (shared memory, gRPC over a Unix socket); false over gRPC on TCP (see <see cref="OffloadCallContext.IsPeerVerified"/>).</summary>
    public bool IsPeerVerified => Call.Inbound.PeerProcessId >= 0;

    /// <summary>Bytes of the MessagePack-encoded arguments.</summary>
    public int RequestBodyBytes => Call.Inbound.BodyMemory.Length;

    /// <summary>Bytes of the buffer arguments (in shared memory); streamed items are not counted.</summary>
    public long RequestPayloadBytes => Call.Inbound.PayloadBytes;

    /// <summary>How many buffer arguments the call carries.</summary>
    public int RequestPayloadCount => Call.Inbound.PayloadCount;

    /// <summary>State shared by the interceptors of this call (and the hosting layer's per-call scope).</summary>
    public IDictionary<object, object?> Items => _items ??= new Dictionary<object, object?>();
}
