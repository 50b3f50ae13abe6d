using System.ComponentModel;
using System.Runtime.CompilerServices;
using MessagePack;
using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>
/// What a generated proxy calls: request out, reply in, payloads as leases. The proxy never sees the
/// transport; the shared-memory connection is one implementation, and a transport to another host
/// is another, without a change to the emitted code. Only this assembly can implement it.
/// </summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public abstract class CallInvoker
{
    private readonly SerializerOptionsSource _serializerOptions;

    private protected CallInvoker(SerializerOptionsSource serializerOptions) => _serializerOptions = serializerOptions;

    /// <summary>The options generated code serializes MessagePack arguments with (per connection: <see cref="OffloadRpcOptions.MessagePackResolver"/>).</summary>
    public MessagePackSerializerOptions SerializerOptions => _serializerOptions.Options;

    /// <summary>Calls <paramref name="method"/>, which has no result. Takes <paramref name="request"/> over, whatever happens.</summary>
    public ValueTask InvokeAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(method);
        ArgumentNullException.ThrowIfNull(request);
        return request.HasDeferredPayloads
            ? GatherThenAwaitAsync(method, request, cancellationToken)
            : AwaitAsync(Send(method, request, cancellationToken));
    }

    /// <summary>Calls <paramref name="method"/> and decodes its result. Takes <paramref name="request"/> over, whatever happens.</summary>
    public ValueTask<T> InvokeAsync<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(method);
        ArgumentNullException.ThrowIfNull(request);
        return request.HasDeferredPayloads
            ? GatherThenAwaitAsync(method, request, cancellationToken)
            : AwaitAsync(Send(method, request, cancellationToken), method.Decoder);
    }

    /// <summary>
    /// Calls <paramref name="method"/>, whose result is a stream of items, each decoded by the method's
    /// decoder. Nothing is sent until the stream is enumerated (once); breaking out of the enumeration or
    /// cancelling either token cancels the call on the server. Takes <paramref name="request"/> over, whatever happens.
    /// </summary>
    public IAsyncEnumerable<T> InvokeStream<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(method);
        ArgumentNullException.ThrowIfNull(request);
        return new ServerStreamCall<T>(this, method, request, cancellationToken);
    }

    /// <summary>A stream whose request could not be encoded: its enumeration throws <paramref name="exception"/>.</summary>
    public static IAsyncEnumerable<T> FailedStream<T>(Exception exception)
    {
        ArgumentNullException.ThrowIfNull(exception);
        return Throw(exception);

        static async IAsyncEnumerable<T> Throw(Exception exception)
        {
            await Task.CompletedTask.ConfigureAwait(false);
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(exception);
            yield break;
        }
    }

    /// <summary>
    /// Sends the request of a streaming call: its items go to the returned inbox as they arrive, and the
    /// reply ends the stream. Takes <paramref name="request"/> over (after its deferred payloads were gathered).
    /// </summary>
    internal virtual ValueTask<RpcReply> SendStreamingAsync(MethodDescriptor method, MessageBuilder request, out StreamInbox inbox, CancellationToken cancellationToken)
    {
        request.Discard();
        throw new NotSupportedException($"This transport does not stream results ({method.FullName}).");
    }

    /// <summary>Decodes a stream item with the method's decoder (a failure is the peer's protocol violation).</summary>
    internal T DecodeItem<T>(ReplyDecoder<T> decoder, RpcReply item) => Decode(decoder, item);

    /// <summary>
    /// Sends the request. Before it returns, everything the request holds has been copied or moved
    /// (the builder is reused at once); the reply arrives through the returned task.
    /// </summary>
    internal abstract ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken);

    private ValueTask<RpcReply> Send(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        try
        {
            return SendAsync(method, request, cancellationToken);
        }
        catch (Exception exception)
        {
            return ValueTask.FromException<RpcReply>(exception); // a failed call is a failed task, never a throw from the proxy
        }
        finally
        {
            request.Return();
        }
    }

    /// <summary>Stream and async-enumerable arguments are read asynchronously first; then the request goes as any other.</summary>
    private async ValueTask<RpcReply> GatherThenSendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        try
        {
            await request.GatherAsync(cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            request.Discard();
            throw;
        }

        return await Send(method, request, cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask GatherThenAwaitAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        using RpcReply reply = await GatherThenSendAsync(method, request, cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask<T> GatherThenAwaitAsync<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken)
    {
        using RpcReply reply = await GatherThenSendAsync(method, request, cancellationToken).ConfigureAwait(false);
        return Decode(method.Decoder, reply);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private static async ValueTask AwaitAsync(ValueTask<RpcReply> pending)
    {
        using RpcReply reply = await pending.ConfigureAwait(false);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<T> AwaitAsync<T>(ValueTask<RpcReply> pending, ReplyDecoder<T> decoder)
    {
        using RpcReply reply = await pending.ConfigureAwait(false);
        return Decode(decoder, reply);
    }

    /// <summary>A reply that does not decode is the peer's protocol violation: its connection ends, and the caller gets that.</summary>
    private T Decode<T>(ReplyDecoder<T> decoder, RpcReply reply)
    {
        try
        {
            return decoder(new CallReply(reply, _serializerOptions));
        }
        catch (Exception ex) when (ex is not (ObjectDisposedException or OperationCanceledException or OutOfMemoryException))
        {
            var violation = ex as ProtocolViolationException ?? new ProtocolViolationException("A reply does not decode: " + ex.Message, ex);
            reply.AbortConnection(violation);
            throw violation;
        }
    }
}

/// <summary>The invoker of a shared-memory connection: the request's body and payloads go through the connection's rings and arena.</summary>
internal sealed class SharedMemoryInvoker : CallInvoker
{
    private readonly RpcConnection _connection;

    public SharedMemoryInvoker(RpcConnection connection, SerializerOptionsSource serializerOptions)
        : base(serializerOptions) => _connection = connection;

    internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
        _connection.CallAsync(method.Id, request.WrittenBody, request.Payloads, cancellationToken);

    internal override ValueTask<RpcReply> SendStreamingAsync(MethodDescriptor method, MessageBuilder request, out StreamInbox inbox, CancellationToken cancellationToken)
    {
        inbox = new StreamInbox(_connection, _connection.StreamWindow);
        try
        {
            return _connection.CallAsync(method.Id, request.WrittenBody, request.Payloads, inbox, cancellationToken);
        }
        catch (Exception exception)
        {
            return ValueTask.FromException<RpcReply>(exception);
        }
        finally
        {
            request.Return();
        }
    }
}

/// <summary>
/// One method of a service contract, created once per method by generated code: its names and
/// stable id, for routing, telemetry and other transports (<see cref="FullName"/> is gRPC's form).
/// </summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public class MethodDescriptor
{
    public MethodDescriptor(string serviceName, string name, int id)
    {
        ArgumentException.ThrowIfNullOrEmpty(serviceName);
        ArgumentException.ThrowIfNullOrEmpty(name);
        ServiceName = serviceName;
        Name = name;
        Id = id;
        FullName = "/" + serviceName + "/" + name;
    }

    /// <summary>The service interface's full name.</summary>
    public string ServiceName { get; }

    /// <summary>The method's name as declared.</summary>
    public string Name { get; }

    /// <summary>The method's stable id (a hash of its signature; both sides compute it).</summary>
    public int Id { get; }

    /// <summary><c>/ServiceName/Name</c>.</summary>
    public string FullName { get; }

    public override string ToString() => FullName;
}

/// <summary>A method with a result, and the generated code that decodes it from a reply.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public sealed class MethodDescriptor<TResult> : MethodDescriptor
{
    public MethodDescriptor(string serviceName, string name, int id, ReplyDecoder<TResult> decoder)
        : base(serviceName, name, id) => Decoder = decoder ?? throw new ArgumentNullException(nameof(decoder));

    /// <summary>Decodes the reply into the result.</summary>
    public ReplyDecoder<TResult> Decoder { get; }
}

/// <summary>Decodes a reply into the method's return value (generated per method).</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public delegate T ReplyDecoder<T>(in CallReply reply);

/// <summary>A reply as the generated decoder sees it: the MessagePack body and the payloads.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public readonly struct CallReply
{
    private readonly RpcReply _reply;

    private readonly SerializerOptionsSource _serializerOptions;

    internal CallReply(RpcReply reply, SerializerOptionsSource serializerOptions)
    {
        _reply = reply;
        _serializerOptions = serializerOptions;
    }

    /// <summary>The options of the connection the reply came on.</summary>
    public MessagePackSerializerOptions SerializerOptions => _serializerOptions.Options;

    /// <summary>A reader over the MessagePack body.</summary>
    public MessagePackReader CreateReader() => new(_reply.BodyMemory);

    /// <summary>Copies payload <paramref name="index"/> out of shared memory into a new array (-1: null).</summary>
    public T[]? CopyArray<T>(int index)
        where T : unmanaged => index < 0 ? null : PayloadConversion.CopyOut<T>(Take(index));

    /// <summary>Takes payload <paramref name="index"/> as a lease the caller owns (-1: null).</summary>
    public SharedBuffer? TakeSharedBuffer(int index) => index < 0 ? null : Take(index);

    /// <summary>
    /// Payload <paramref name="index"/> in place, in shared memory (-1: empty). Only a stream item lends
    /// its payloads: the memory stays valid until the consumer asks for the next item.
    /// </summary>
    public Memory<T> GetMemory<T>(int index)
        where T : unmanaged
    {
        if (index < 0)
        {
            return Memory<T>.Empty;
        }

        if ((uint)index >= (uint)_reply.PayloadCount)
        {
            throw new ProtocolViolationException($"The reply names payload {index} but carries {_reply.PayloadCount}.");
        }

        return _reply.LendPayload(index).CreateMemory<T>();
    }

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
    /// <summary>Copies a lease's bytes into a new array of <typeparamref name="T"/> and gives the lease back.</summary>
    public static T[] CopyOut<T>(SharedBuffer lease)
        where T : unmanaged
    {
        using SharedBuffer owned = lease;
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
