using System.ComponentModel;
using MessagePack;
using OffloadRpc.Transport;

namespace OffloadRpc.Runtime;

/// <summary>
/// A call as the generated stub sees it: the MessagePack body, the payloads (memory that points into
/// shared memory, valid until the call completes), cancellation, and the reply.
/// </summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public sealed class ServerCall
{
    private readonly IncomingCall _call;
    private List<SharedBuffer>? _leases;

    internal ServerCall(IncomingCall call) => _call = call;

    /// <summary>Fires when the caller cancels or disconnects.</summary>
    public CancellationToken CancellationToken => _call.CancellationToken;

    /// <summary>A reader over the MessagePack body.</summary>
    public MessagePackReader CreateReader() => new(_call.BodyMemory);

    /// <summary>Payload <paramref name="index"/> in place, in shared memory, until the call completes (-1: empty).</summary>
    public Memory<T> GetMemory<T>(int index)
        where T : unmanaged
    {
        if (index < 0)
        {
            return Memory<T>.Empty;
        }

        SharedBuffer lease = Take(index);
        (_leases ??= new List<SharedBuffer>(2)).Add(lease);
        return lease.CreateMemory<T>();
    }

    /// <summary>Payload <paramref name="index"/> copied into a new array (-1: null).</summary>
    public T[]? CopyArray<T>(int index)
        where T : unmanaged
    {
        if (index < 0)
        {
            return null;
        }

        using SharedBuffer lease = Take(index);
        return PayloadConversion.ToArray<T>(lease);
    }

    /// <summary>Payload <paramref name="index"/> as a lease the implementation owns from now on (-1: null).</summary>
    public SharedBuffer? TakeSharedBuffer(int index) => index < 0 ? null : Take(index);

    /// <summary>Sends the response built in <paramref name="response"/>.</summary>
    public void Reply(MessageBuilder response)
    {
        ArgumentNullException.ThrowIfNull(response);
        try
        {
            _call.Reply(response.WrittenBody, response.Payloads);
        }
        finally
        {
            response.Return();
        }
    }

    private SharedBuffer Take(int index)
    {
        if ((uint)index >= (uint)_call.PayloadCount)
        {
            throw new ProtocolViolationException($"The request names payload {index} but carries {_call.PayloadCount}.");
        }

        return _call.TakePayload(index);
    }

    /// <summary>The method has completed: the memory it was lent goes back.</summary>
    internal void Complete()
    {
        if (_leases is not null)
        {
            foreach (SharedBuffer lease in _leases)
            {
                lease.Dispose();
            }

            _leases = null;
        }
    }
}
