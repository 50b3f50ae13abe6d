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
    private readonly int _maxBodyBytes;
    private readonly LeaseBudget? _replyBudget;

    /// <summary>The largest body a reply or a streamed item may assemble to (OffloadRpcOptions.MaxMessageBytes).</summary>
    internal int MaxBodyBytes => _maxBodyBytes;

    /// <summary>What the buffers of replies and streamed items count against (OffloadRpcOptions.MaxBufferedReplyBytes); null: only the process's mapping cap.</summary>
    internal LeaseBudget? ReplyBudget => _replyBudget;

    public GrpcInvoker(global::Grpc.Core.CallInvoker channel, GrpcRemoteConnection connection, SerializerOptionsSource serializerOptions, int maxBodyBytes, LeaseBudget? replyBudget = null)
        : base(serializerOptions)
    {
        _channel = channel;
        _connection = connection;
        _maxBodyBytes = maxBodyBytes;
        _replyBudget = replyBudget;
    }

    internal global::Grpc.Core.CallInvoker Channel => _channel;

    internal GrpcRemoteConnection Connection => _connection;

    /// <summary>The serializer options of the connection, for the pump of a streamed argument.</summary>
    internal SerializerOptionsSource Options => SerializerOptionsSource;

    internal override IAsyncEnumerable<T> CreateServerStream<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken) =>
        new GrpcServerStream<T>(this, method, request, default, cancellationToken);

    /// <summary>An observed streamed result: its metadata block goes as the binary header, its deadline as gRPC's own.</summary>
    internal override IAsyncEnumerable<T> CreateObservedServerStream<T>(MethodDescriptor<T> method, ClientInterceptorContext context)
    {
        OutgoingMetadata metadata = OutgoingMetadata.Of(context);
        return new GrpcServerStream<T>(this, method, context.TakeRequest(), GrpcCallMetadata.Of(metadata), context.CancellationToken);
    }

    internal static GrpcMethod MethodOf(MethodDescriptor method)
    {
        if (Volatile.Read(ref method.TransportMethod) is GrpcMethod made)
        {
            return made;
        }

        var grpc = new GrpcMethod(method);
        return Interlocked.CompareExchange(ref method.TransportMethod, grpc, null) as GrpcMethod ?? grpc; // another thread's, or ours
    }

    internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
        SendAsync(method, request, default(GrpcCallMetadata), cancellationToken);

    internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, in OutgoingMetadata metadata, CancellationToken cancellationToken) =>
        SendAsync(method, request, GrpcCallMetadata.Of(metadata), cancellationToken);

    /// <summary>
    /// Takes the request (and its streamed argument) over before it returns, the reply comes through the
    /// task. The caller's buffers are not copied: they are read as the frames go out, and the task
    /// completes only after the request's writer has let go of them (pooled, transient ones are copied).
    /// </summary>
    private ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, in GrpcCallMetadata metadata, CancellationToken cancellationToken)
    {
        GrpcMethod grpc = MethodOf(method);
        ItemStream? items = request.TakeItemStream();
        OutgoingMessage message = OutgoingMessage.Create(request.WrittenBody, request.Payloads, borrow: true);
        if (items is null && grpc.OneFrameReply && message.IsSingleFrame)
        {
            return UnaryAsync(grpc, method, message, metadata, cancellationToken);
        }

        GrpcClientCall call;
        try
        {
            call = GrpcClientCall.Start(this, grpc, message, metadata, items is not null, cancellationToken);
        }
        catch
        {
            message.Dispose();
            throw;
        }

        ValueTask<RpcReply> reply = ReplyAsync(call, method, cancellationToken);
        return items is null ? reply : items.SendWhileAwaitingAsync(reply, call.Outbox!, SerializerOptionsSource, cancellationToken);
    }

    /// <summary>
    /// A call with nothing around it whose request is one frame, to a method whose reply is one frame: the
    /// request's head frame is written straight from the builder, and the reply decoded in the same async
    /// step that awaits it (see <see cref="UnaryDecodeAsync"/>). Anything else goes the general way.
    /// </summary>
    internal override ValueTask<T> InvokeLeanAsync<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken) =>
        TryLeanHead(method, request, out GrpcMethod? grpc, out Frame? head) switch
        {
            { } failure => ValueTask.FromException<T>(failure), // a failed call is a failed task, never a throw from the proxy
            null when head is null => base.InvokeLeanAsync(method, request, cancellationToken),
            _ => UnaryDecodeAsync(grpc!, method, head, cancellationToken),
        };

    /// <inheritdoc cref="InvokeLeanAsync{T}"/>
    internal override ValueTask InvokeLeanAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
        TryLeanHead(method, request, out GrpcMethod? grpc, out Frame? head) switch
        {
            { } failure => ValueTask.FromException(failure),
            null when head is null => base.InvokeLeanAsync(method, request, cancellationToken),
            _ => UnaryVoidAsync(grpc!, method, head, cancellationToken),
        };

    /// <summary>
    /// The request's head frame when the call can go as one unary step (the builder is given back); null
    /// <paramref name="head"/> and no exception when it cannot (the builder untouched, for the general way);
    /// the exception when the call failed (the builder and its leases given back).
    /// </summary>
    private static Exception? TryLeanHead(MethodDescriptor method, MessageBuilder request, out GrpcMethod? grpc, out Frame? head)
    {
        head = null;
        try
        {
            grpc = MethodOf(method);
        }
        catch (Exception exception)
        {
            grpc = null;
            request.Discard();
            return exception;
        }

        if (!grpc.OneFrameReply || request.HasItemStream || !OutgoingMessage.IsInline(request.Payloads))
        {
            return null;
        }

        try
        {
            head = OutgoingMessage.HeadFrame(request.WrittenBody, request.Payloads, releaseAfterWrite: false); // takes its leases over, whatever happens
            return null;
        }
        catch (Exception exception)
        {
            return exception;
        }
        finally
        {
            request.Return();
        }
    }

    /// <summary>
    /// A request of one frame to a method whose reply is one frame: a unary call, whatever the method is
    /// bound as (on the wire a unary call is a streaming call of one message each way), so gRPC makes no
    /// stream reader, and its response and status come back as one completion.
    /// </summary>
    [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<RpcReply> UnaryAsync(GrpcMethod grpc, MethodDescriptor method, OutgoingMessage message, GrpcCallMetadata metadata, CancellationToken cancellationToken)
    {
        Frame head = message.DetachHead(releaseAfterWrite: false);
        message.Dispose(); // a one-frame message holds nothing else
        try
        {
            AsyncUnaryCall<Frame> call = _channel.AsyncUnaryCall(grpc.Unary, null, GrpcClientCall.OptionsOf(metadata, cancellationToken), head); // not disposed: see UnaryDecodeAsync
            return AcceptReply(await call.ResponseAsync.ConfigureAwait(false), method);
        }
        catch (Exception ex)
        {
            throw Translate(ex, method, metadata.Deadline, cancellationToken);
        }
        finally
        {
            head.Release(); // written by now, or never will be: a write under way gives it back when done
        }
    }

    /// <summary><see cref="UnaryAsync"/> of a call with no metadata, its result decoded in the same step (one state machine per call, not two).</summary>
    [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<T> UnaryDecodeAsync<T>(GrpcMethod grpc, MethodDescriptor<T> method, Frame head, CancellationToken cancellationToken)
    {
        RpcReply reply;
        try
        {
            // Not disposed: a unary call cleans itself up once its response has been read or it failed (as
            // gRPC's generated clients, which never dispose one); disposing it after that runs the clean-up again.
            AsyncUnaryCall<Frame> call = _channel.AsyncUnaryCall(grpc.Unary, null, new CallOptions(cancellationToken: cancellationToken), head);
            reply = AcceptReply(await call.ResponseAsync.ConfigureAwait(false), method, frameMayServe: true);
        }
        catch (Exception ex)
        {
            throw Translate(ex, method, null, cancellationToken);
        }
        finally
        {
            head.Release(); // written by now, or never will be: a write under way gives it back when done
        }

        using (reply)
        {
            try
            {
                return Decode(method.Decoder, reply);
            }
            catch (ProtocolViolationException violation)
            {
                _connection.AbortConnection(violation); // a reply that is its frame cannot tell the connection itself
                throw;
            }
        }
    }

    /// <summary><see cref="UnaryDecodeAsync"/> of a method without a result: the reply is checked and given back.</summary>
    [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask UnaryVoidAsync(GrpcMethod grpc, MethodDescriptor method, Frame head, CancellationToken cancellationToken)
    {
        try
        {
            AsyncUnaryCall<Frame> call = _channel.AsyncUnaryCall(grpc.Unary, null, new CallOptions(cancellationToken: cancellationToken), head); // not disposed: see UnaryDecodeAsync
            AcceptReply(await call.ResponseAsync.ConfigureAwait(false), method, frameMayServe: true).Dispose();
        }
        catch (Exception ex)
        {
            throw Translate(ex, method, null, cancellationToken);
        }
        finally
        {
            head.Release(); // written by now, or never will be: a write under way gives it back when done
        }
    }

    /// <summary>
    /// The reply frame of a unary call as the call's reply; a reply of several frames breaks the protocol.
    /// With <paramref name="frameMayServe"/> (the caller ends the connection itself when the reply does not
    /// decode), a whole message without payloads is its own reply, with no assembler around it.
    /// </summary>
    private RpcReply AcceptReply(Frame frame, MethodDescriptor method, bool frameMayServe = false)
    {
        if (frameMayServe && frame.IsWholeMessage(_maxBodyBytes))
        {
            _connection.MarkAlive();
            return new RpcReply(frame, 0);
        }

        var assembler = new MessageAssembler(_maxBodyBytes, _replyBudget);
        assembler.ReceiveArray(method.ResultArray); // an array result is read into its array, not copied out of a lease
        try
        {
            if (!assembler.Accept(frame) || assembler.HeadKind != FrameKind.Head)
            {
                throw new ProtocolViolationException($"The reply of {method.FullName} is not one frame.");
            }
        }
        catch
        {
            assembler.Dispose();
            throw;
        }

        _connection.MarkAlive();
        return assembler.ToReply(_connection);
    }

    private async ValueTask<RpcReply> ReplyAsync(GrpcClientCall call, MethodDescriptor method, CancellationToken cancellationToken)
    {
        var assembler = new MessageAssembler(_maxBodyBytes, _replyBudget);
        assembler.ReceiveArray(method.ResultArray);
        try
        {
            try
            {
                if (!await call.ReadMessageAsync(assembler, cancellationToken).ConfigureAwait(false) || assembler.HeadKind != FrameKind.Head)
                {
                    throw new ProtocolViolationException($"The gRPC call of {method.FullName} ended without a complete reply.");
                }

                await call.ReadEndAsync(cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                await call.DisposeAsync().ConfigureAwait(false);
            }

            _connection.MarkAlive();
            return assembler.ToReply(_connection);
        }
        catch (Exception ex)
        {
            assembler.Dispose();
            throw call.Translate(ex, method, cancellationToken);
        }
    }

    /// <summary>gRPC's outcome as this library's exceptions, the same as over shared memory.</summary>
    internal Exception Translate(Exception ex, MethodDescriptor method, DateTime? deadline, CancellationToken cancellationToken)
    {
        if (ex is not RpcException rpc)
        {
            if (ex is OperationCanceledException && cancellationToken.IsCancellationRequested)
            {
                return new OperationCanceledException(cancellationToken);
            }

            // A call (a stream, say) still running when its connection was disposed: a reconnecting client
            // disposes the connection it replaces. Told as a unary call of it is, not as gRPC's disposal.
            return ex is ObjectDisposedException && _connection.IsDisposed
                ? new PeerDisconnectedException($"The connection to the gRPC server at {_connection.Address} was disposed during {method.FullName}.", ex)
                : ex;
        }

        string? type = rpc.Trailers.GetValue(GrpcWire.FaultTypeTrailer);
        if (type is not null)
        {
            return new RemoteInvocationException(type, rpc.Status.Detail, rpc.Trailers.GetValueBytes(GrpcWire.FaultStackTrailer) is { } stack ? System.Text.Encoding.UTF8.GetString(stack) : null);
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
                if (_connection.IsDisposed)
                {
                    return new PeerDisconnectedException($"The connection to the gRPC server at {_connection.Address} was disposed during {method.FullName}.", rpc);
                }

                _connection.MarkDisconnected();
                return new PeerDisconnectedException($"The gRPC server at {_connection.Address} went away during {method.FullName}: {rpc.Status.Detail}", rpc);
            case StatusCode.ResourceExhausted:
                return ResourceExhausted(rpc, method);
            case StatusCode.Unauthenticated or StatusCode.PermissionDenied:
                return Refused(rpc, $"{method.FullName} was refused by the gRPC server at {_connection.Address}");
            case StatusCode.Unimplemented:
                return new ContractMismatchException($"The gRPC server at {_connection.Address} does not serve {method.FullName}.", rpc) { ServiceName = method.ServiceName };
            default:
                return new RemoteInvocationException(typeof(RpcException).FullName!, $"{rpc.StatusCode}: {rpc.Status.Detail}", null);
        }
    }

    /// <summary>
    /// A call or connection the server refused to an unauthenticated or unauthorized caller (the
    /// application's authentication and authorization policies, say RequireAuthorization on
    /// MapOffloadRpcGrpc), as the shared-memory transport refuses a user it does not allow: an
    /// <see cref="UnauthorizedAccessException"/>. The connection serves on: a later call with credentials
    /// the server accepts succeeds.
    /// </summary>
    internal static UnauthorizedAccessException Refused(RpcException rpc, string what) =>
        new($"{what}: {rpc.StatusCode}{(rpc.Status.Detail is { Length: > 0 } detail ? " (" + detail + ")" : string.Empty)}. "
            + "Over gRPC the server's authentication and authorization decide who may call: give the channel credentials it accepts (OffloadRpcOptions.ConfigureGrpcChannel).", rpc);

    /// <summary>
    /// A call that gRPC ended with ResourceExhausted: a message above a size limit, this side's (refused
    /// before it was sent, or when it arrived) or the server's, or a server without room for the request's
    /// buffers at the moment. The connection serves on.
    /// </summary>
    internal static OffloadRpcException ResourceExhausted(RpcException rpc, MethodDescriptor method) =>
        new(rpc.Status.Detail.Contains("message size", StringComparison.OrdinalIgnoreCase)
            ? $"{method.FullName} failed: gRPC refused a message as too large ({rpc.Status.Detail}). Buffers cross in frames of at most {Frame.MinMessageLimit:N0} bytes, but a call's "
                + "MessagePack arguments or result go in one frame: raise MaxSendMessageSize and MaxReceiveMessageSize (OffloadRpcOptions.ConfigureGrpcChannel; null for no limit) or pass large data as a buffer."
            : $"{method.FullName} failed: the server had no room for it ({rpc.Status.Detail}).", rpc);
}

/// <summary>The side a message came from, told when the message breaks the protocol.</summary>
internal interface IGrpcPeer
{
    void AbortConnection(ProtocolViolationException violation);
}
