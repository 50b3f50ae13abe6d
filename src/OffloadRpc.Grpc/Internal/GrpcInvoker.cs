using System.Buffers;
using System.Collections.Concurrent;
using global::Grpc.Core;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>
/// The invoker of a gRPC connection: each call of a contract method is a gRPC call of
/// <c>/{Namespace.Interface}/{Method}</c>; the request goes as frames (its head, then its buffers in
/// chunks), the reply comes back the same way. Metadata (headers, deadline, trace context) travels as
/// the binary gRPC header <see cref="GrpcWire.MetadataHeader"/>, the deadline also as gRPC's own.
/// </summary>
internal sealed class GrpcInvoker : OffloadRpc.Internal.CallInvoker
{
    private readonly global::Grpc.Core.CallInvoker _channel;
    private readonly GrpcRemoteConnection _connection;
    private readonly ConcurrentDictionary<string, Method<Frame, Frame>> _methods = new();
    private readonly int _maxBodyBytes;

    /// <summary>The largest body a reply or a streamed item may assemble to (OffloadRpcOptions.MaxMessageBytes).</summary>
    internal int MaxBodyBytes => _maxBodyBytes;
    private readonly Metadata.Entry _peer;

    public GrpcInvoker(global::Grpc.Core.CallInvoker channel, GrpcRemoteConnection connection, SerializerOptionsSource serializerOptions, int maxBodyBytes)
        : base(serializerOptions)
    {
        _channel = channel;
        _connection = connection;
        _maxBodyBytes = maxBodyBytes;
        _peer = new Metadata.Entry(GrpcWire.PeerHeader, $"{Environment.ProcessId}:{Interop.LinuxNative.GetEuid()}");
    }

    internal global::Grpc.Core.CallInvoker Channel => _channel;

    internal GrpcRemoteConnection Connection => _connection;

    internal Metadata Headers() => [_peer];

    internal override IAsyncEnumerable<T> CreateServerStream<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken)
    {
        if (request.TakeItemStream() is not null)
        {
            request.Discard();
            return FailedStream<T>(new NotSupportedException($"{method.FullName} takes a streamed argument: client streaming and duplex calls are not carried over gRPC yet (use the shared-memory transport)."));
        }

        return new GrpcServerStream<T>(this, method, request, cancellationToken);
    }

    internal Method<Frame, Frame> MethodOf(MethodDescriptor method) =>
        _methods.GetOrAdd(method.FullName, static (_, m) => GrpcWire.Method(m.ServiceName, m.Name), method);

    internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
        SendAsync(method, request, default, cancellationToken);

    internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, ReadOnlyMemory<byte> metadata, CancellationToken cancellationToken)
    {
        if (request.TakeItemStream() is not null)
        {
            request.Discard();
            throw new NotSupportedException($"{method.FullName} takes a streamed argument: client streaming is not carried over gRPC yet (use the shared-memory transport).");
        }

        OutgoingMessage message = OutgoingMessage.Create(request.WrittenBody, request.Payloads);
        byte[]? block = metadata.IsEmpty ? null : metadata.ToArray();
        return CallAsync(method, message, block, cancellationToken);
    }

    private async ValueTask<RpcReply> CallAsync(MethodDescriptor method, OutgoingMessage message, byte[]? block, CancellationToken cancellationToken)
    {
        DateTime? deadline = null;
        Metadata headers = Headers();
        if (block is not null)
        {
            headers.Add(GrpcWire.MetadataHeader, block);
            if (CallMetadata.Decode(block).DeadlineRemaining is { } remaining)
            {
                deadline = DateTime.UtcNow + remaining;
            }
        }

        var options = new CallOptions(headers, deadline, cancellationToken);
        var assembler = new MessageAssembler(_maxBodyBytes);
        try
        {
            using (message)
            {
                if (message.IsSingleFrame)
                {
                    using AsyncServerStreamingCall<Frame> call = _channel.AsyncServerStreamingCall(MethodOf(method), null, options, message.Head);
                    await ReadAsync(call.ResponseStream, assembler, cancellationToken).ConfigureAwait(false);
                }
                else
                {
                    using AsyncDuplexStreamingCall<Frame, Frame> call = _channel.AsyncDuplexStreamingCall(MethodOf(method), null, options);
                    foreach (Frame frame in message.Frames())
                    {
                        await call.RequestStream.WriteAsync(frame, cancellationToken).ConfigureAwait(false);
                    }

                    await call.RequestStream.CompleteAsync().ConfigureAwait(false);
                    await ReadAsync(call.ResponseStream, assembler, cancellationToken).ConfigureAwait(false);
                }
            }

            _connection.MarkAlive();
            return new RpcReply(new GrpcReply(assembler, _connection), 0);
        }
        catch (Exception ex)
        {
            assembler.Dispose();
            throw Translate(ex, method, deadline, cancellationToken);
        }
    }

    private static async ValueTask ReadAsync(IAsyncStreamReader<Frame> frames, MessageAssembler assembler, CancellationToken cancellationToken)
    {
        while (await frames.MoveNext(cancellationToken).ConfigureAwait(false))
        {
            if (assembler.Accept(frames.Current))
            {
                return; // the server ends the call right after its reply
            }
        }

        throw new ProtocolViolationException("The gRPC call ended without a complete reply.");
    }

    /// <summary>gRPC's outcome as this library's exceptions, the same as over shared memory.</summary>
    internal Exception Translate(Exception ex, MethodDescriptor method, DateTime? deadline, CancellationToken cancellationToken)
    {
        if (ex is not RpcException rpc)
        {
            return ex is OperationCanceledException && cancellationToken.IsCancellationRequested ? new OperationCanceledException(cancellationToken) : ex;
        }

        string? type = rpc.Trailers.GetValue(GrpcWire.FaultTypeTrailer);
        if (type is not null)
        {
            return new RemoteInvocationException(type, rpc.Status.Detail, rpc.Trailers.GetValue(GrpcWire.FaultStackTrailer));
        }

        if (rpc.Trailers.GetValue(GrpcWire.ViolationTrailer) is { } violation)
        {
            return new ProtocolViolationException("The server refused the call as a protocol violation: " + violation);
        }

        switch (rpc.StatusCode)
        {
            case StatusCode.Cancelled when cancellationToken.IsCancellationRequested:
                return new OperationCanceledException(cancellationToken);
            case StatusCode.DeadlineExceeded:
                return new DeadlineExceededException($"{method.FullName} did not complete before its deadline ({deadline:O}).", rpc) { Deadline = deadline ?? DateTime.UtcNow, Method = method.FullName };
            case StatusCode.Unavailable:
            case StatusCode.Cancelled:
            case StatusCode.Internal when rpc.Status.DebugException is not null:
                _connection.MarkDisconnected();
                return new PeerDisconnectedException($"The gRPC server at {_connection.Address} went away during {method.FullName}: {rpc.Status.Detail}", rpc);
            case StatusCode.Unimplemented:
                return new ContractMismatchException($"The gRPC server at {_connection.Address} does not serve {method.FullName}.", rpc) { ServiceName = method.ServiceName };
            default:
                return new RemoteInvocationException(typeof(RpcException).FullName!, $"{rpc.StatusCode}: {rpc.Status.Detail}", null);
        }
    }
}

/// <summary>A reply that came over gRPC: its body and payloads (ordinary memory) until it is disposed.</summary>
internal sealed class GrpcReply : IReplySource
{
    private readonly MessageAssembler _message;
    private readonly GrpcRemoteConnection _connection;
    private int _disposed;

    public GrpcReply(MessageAssembler message, GrpcRemoteConnection connection)
    {
        _message = message;
        _connection = connection;
    }

    public ReadOnlySpan<byte> Body => _message.Body.Span;

    public ReadOnlyMemory<byte> BodyMemory => _message.Body;

    public int PayloadCount => _message.PayloadCount;

    public SharedBuffer TakePayload(int index) =>
        _message.Take(index) ?? throw new ProtocolViolationException($"The reply names payload {index} twice.");

    public SharedBuffer LendPayload(int index) =>
        _message.Take(index) is { } lease ? Lent(index, lease) : throw new ProtocolViolationException($"The reply names payload {index} twice.");

    private List<SharedBuffer>? _lent;

    private SharedBuffer Lent(int index, SharedBuffer lease)
    {
        (_lent ??= []).Add(lease);
        return lease;
    }

    public void ThrowIfReplyGone(short version) => ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, typeof(RpcReply));

    public void DisposeReply(short version)
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
        {
            _message.Dispose();
            if (_lent is not null)
            {
                foreach (SharedBuffer lease in _lent)
                {
                    lease.Dispose();
                }
            }
        }
    }

    public void AbortConnection(ProtocolViolationException violation) => _connection.MarkDisconnected();
}
