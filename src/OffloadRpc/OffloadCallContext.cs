using OffloadRpc.Internal;

namespace OffloadRpc;

/// <summary>
/// What a server method knows about the call it is serving. <see cref="Current"/> is set for the
/// duration of the method (it flows across awaits) and is null outside a call.
/// </summary>
public sealed class OffloadCallContext
{
    /// <summary>The call being served: its context is made when first asked for (most methods never ask).</summary>
    private static readonly AsyncLocal<ServerCall?> s_serving = new();
    private readonly ServerCall _call;

    internal OffloadCallContext(ServerCall call) => _call = call;

    /// <summary>The call being served on this logical thread, or null.</summary>
    public static OffloadCallContext? Current => s_serving.Value?.CallContext;

    /// <summary>Sets the call being served on this logical thread (null: none).</summary>
    internal static ServerCall? Serving
    {
        get => s_serving.Value;
        set => s_serving.Value = value;
    }

    /// <summary>Fires when the caller cancels the call or disconnects, or at the caller's deadline.</summary>
    /// <remarks>
    /// Created on first use; read after the call completed it is a cancelled token. It is the call's only while
    /// the call runs: as ASP.NET Core does with <c>HttpContext.RequestAborted</c>, a source that never fired serves
    /// the connection's next call, so work that outlives the call needs a token of its own.
    /// </remarks>
    public CancellationToken CancellationToken => _call.CancellationToken;

    /// <summary>The headers the caller set for this call (<see cref="OffloadCallScope"/> or a client interceptor); empty when none.</summary>
    public IReadOnlyDictionary<string, string> RequestHeaders => _call.RequestHeaders;

    /// <summary>The caller's deadline (UTC, in this process's clock), or null. <see cref="CancellationToken"/> fires at it.</summary>
    public DateTime? Deadline => _call.Deadline;

    /// <summary>The service interface's full name of the call being served.</summary>
    public string ServiceName => _call.Method.ServiceName;

    /// <summary>The name of the method being served.</summary>
    public string MethodName => _call.Method.Name;

    /// <summary>
    /// The calling process's id, from the kernel (SO_PEERCRED on the shared-memory socket, or on the Unix
    /// socket a gRPC call came over; 0 when the caller is in a process namespace this one cannot see); -1
    /// when the transport cannot verify who called (gRPC over TCP: the caller may be on another host, and
    /// nothing it claims is reported). See <see cref="IsPeerVerified"/>.
    /// </summary>
    public int PeerProcessId => _call.Inbound.PeerProcessId;

    /// <summary>The calling process's user id, from the kernel (SO_PEERCRED); <see cref="uint.MaxValue"/> when the transport cannot verify it (gRPC over TCP).</summary>
    public uint PeerUserId => _call.Inbound.PeerUserId;

    /// <summary>
    /// True when <see cref="PeerProcessId"/> and <see cref="PeerUserId"/> come from the kernel (the
    /// shared-memory transport, or gRPC over a Unix socket, where they name the process that connected the
    /// socket: a proxy, if one is in between, and no AllowedUserIds check ran, only the socket file's
    /// permissions); false over gRPC on TCP, where they are -1 and <see cref="uint.MaxValue"/>: authorize
    /// such calls by the channel (TLS client certificates, tokens checked by an interceptor).
    /// </summary>
    public bool IsPeerVerified => _call.Inbound.PeerProcessId >= 0;

    /// <summary>
    /// Rents <paramref name="bytes"/> of shared memory from the calling connection, to fill in place
    /// and return from the method as a <see cref="SharedBuffer"/> without a copy.
    /// </summary>
    public SharedBuffer Rent(int bytes) => _call.Inbound.Rent(bytes, CancellationToken.None);

    /// <summary>As <see cref="Rent(int)"/>, giving up with <see cref="OperationCanceledException"/> when <paramref name="cancellationToken"/> fires while the arena is full.</summary>
    public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) => _call.Inbound.Rent(bytes, cancellationToken);
}
