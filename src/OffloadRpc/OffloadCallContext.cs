using OffloadRpc.Transport;

namespace OffloadRpc;

/// <summary>
/// What a server method knows about the call it is serving. <see cref="Current"/> is set for the
/// duration of the method (it flows across awaits) and is null outside a call.
/// </summary>
public sealed class OffloadCallContext
{
    private static readonly AsyncLocal<OffloadCallContext?> s_current = new();
    private readonly RpcConnection _connection;
    private readonly Runtime.ServerCall _call;

    internal OffloadCallContext(RpcConnection connection, Runtime.ServerCall call)
    {
        _connection = connection;
        _call = call;
    }

    /// <summary>The call being served on this logical thread, or null.</summary>
    public static OffloadCallContext? Current
    {
        get => s_current.Value;
        internal set => s_current.Value = value;
    }

    /// <summary>Fires when the caller cancels the call or disconnects.</summary>
    /// <remarks>Created on first use (most calls never ask); read after the call completed it is a cancelled token.</remarks>
    public CancellationToken CancellationToken => _call.CancellationToken;

    /// <summary>The calling process's id (from the kernel, SO_PEERCRED).</summary>
    public int PeerProcessId => _connection.Peer.ProcessId;

    /// <summary>The calling process's user id (from the kernel, SO_PEERCRED).</summary>
    public uint PeerUserId => _connection.Peer.UserId;

    /// <summary>
    /// Rents <paramref name="bytes"/> of shared memory from the calling connection, to fill in place
    /// and return from the method as a <see cref="SharedBuffer"/> without a copy.
    /// </summary>
    public SharedBuffer Rent(int bytes) => _connection.Rent(bytes, CancellationToken.None);

    /// <summary>As <see cref="Rent(int)"/>, giving up with <see cref="OperationCanceledException"/> when <paramref name="cancellationToken"/> fires while the arena is full.</summary>
    public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) => _connection.Rent(bytes, cancellationToken);
}
