using System.ComponentModel;
using System.Runtime.CompilerServices;
using MessagePack;
using OffloadRpc.Transport;

namespace OffloadRpc.Runtime;

/// <summary>Decodes a reply into the method's return value (generated per method).</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public delegate T ReplyDecoder<T>(in CallReply reply);

/// <summary>Sends a generated proxy's request and awaits its reply.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public static class ClientInvoker
{
    /// <summary>Calls a method without a result.</summary>
    public static ValueTask InvokeAsync(OffloadRpcConnection connection, int methodId, MessageBuilder request, CancellationToken cancellationToken)
    {
        ValueTask<RpcReply> pending = Send(connection, methodId, request, cancellationToken);
        return AwaitAsync(pending);
    }

    /// <summary>Calls a method and decodes its result.</summary>
    public static ValueTask<T> InvokeAsync<T>(OffloadRpcConnection connection, int methodId, MessageBuilder request, ReplyDecoder<T> decoder, CancellationToken cancellationToken)
    {
        ValueTask<RpcReply> pending = Send(connection, methodId, request, cancellationToken);
        return AwaitAsync(pending, decoder);
    }

    private static ValueTask<RpcReply> Send(OffloadRpcConnection connection, int methodId, MessageBuilder request, CancellationToken cancellationToken)
    {
        try
        {
            return connection.Transport.CallAsync(methodId, request.WrittenBody, request.Payloads, cancellationToken);
        }
        finally
        {
            request.Return(); // everything is in shared memory (or owned by the call) by now
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private static async ValueTask AwaitAsync(ValueTask<RpcReply> pending)
    {
        using RpcReply reply = await pending.ConfigureAwait(false);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private static async ValueTask<T> AwaitAsync<T>(ValueTask<RpcReply> pending, ReplyDecoder<T> decoder)
    {
        using RpcReply reply = await pending.ConfigureAwait(false);
        return decoder(new CallReply(reply));
    }
}

/// <summary>A reply as the generated decoder sees it: the MessagePack body and the payloads.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public readonly struct CallReply
{
    private readonly RpcReply _reply;

    internal CallReply(RpcReply reply) => _reply = reply;

    /// <summary>A reader over the MessagePack body.</summary>
    public MessagePackReader CreateReader() => new(_reply.BodyMemory);

    /// <summary>Copies payload <paramref name="index"/> out of shared memory into a new array (-1: null).</summary>
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

    /// <summary>Takes payload <paramref name="index"/> as a lease the caller owns (-1: null).</summary>
    public SharedBuffer? TakeSharedBuffer(int index) => index < 0 ? null : Take(index);

    private SharedBuffer Take(int index)
    {
        if ((uint)index >= (uint)_reply.PayloadCount)
        {
            throw new ProtocolViolationException($"The reply names payload {index} but carries {_reply.PayloadCount}.");
        }

        return _reply.TakePayload(index);
    }
}

internal static class PayloadConversion
{
    public static T[] ToArray<T>(SharedBuffer lease)
        where T : unmanaged
    {
        int size = Unsafe.SizeOf<T>();
        if (lease.Length % size != 0)
        {
            throw new ProtocolViolationException($"A payload of {lease.Length} bytes is not a whole number of {typeof(T).Name} ({size} bytes each).");
        }

        T[] array = GC.AllocateUninitializedArray<T>(lease.Length / size);
        lease.Span.CopyTo(System.Runtime.InteropServices.MemoryMarshal.AsBytes(array.AsSpan()));
        return array;
    }
}
