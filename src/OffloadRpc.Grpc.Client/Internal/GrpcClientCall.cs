using System.Buffers;
using System.Threading.Channels;
using global::Grpc.Core;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>
/// One streaming gRPC call of a contract method, client side (a one-frame request whose reply is one
/// frame goes as a unary call instead, see GrpcInvoker). A request that is its head frame alone, without
/// a streamed argument, goes as a server-streaming call; a larger request to a method whose reply is one
/// frame as a client-streaming call; otherwise the call is duplex. A writer sends the request's frames,
/// then the streamed argument's items (each as the server's credit allows, see <see cref="Outbox"/>),
/// then the end or the caller's fault. What comes back is read with
/// <see cref="ReadMessageAsync"/>: credit frames feed the outbox, items and the reply are assembled.
/// </summary>
internal sealed class GrpcClientCall : IStreamItemSink
{
    private readonly GrpcInvoker _invoker;
    private readonly OutgoingMessage _message;
    private readonly IDisposable _call;
    private readonly Channel<OutgoingMessage>? _items;
    private readonly Task? _writer;

    /// <summary>
    /// Stops the writer (the caller's token linked in): a server that answered, or failed, before it read
    /// the whole request no longer reads it, and a write waiting for HTTP/2 flow control would wait for ever.
    /// </summary>
    private readonly CancellationTokenSource? _writing;
    private readonly Frame? _head;
    private Exception? _fault;

    /// <summary>gRPC refused to send one of the request's frames (above the channel's MaxSendMessageSize): the call failed with this.</summary>
    private RpcException? _refused;

    private GrpcClientCall(GrpcInvoker invoker, GrpcMethod method, OutgoingMessage message, in GrpcCallMetadata metadata, bool streamsItems, CancellationToken cancellationToken)
    {
        _invoker = invoker;
        _message = message;
        CallOptions options = OptionsOf(metadata, cancellationToken);
        Deadline = metadata.Deadline;
        if (message.IsSingleFrame && !streamsItems)
        {
            _head = message.DetachHead(releaseAfterWrite: false); // gRPC writes it on its own schedule: see DisposeAsync
            AsyncServerStreamingCall<Frame> call = invoker.Channel.AsyncServerStreamingCall(method.ServerStreaming, null, options, _head);
            _call = call;
            Responses = call.ResponseStream;
            return;
        }

        switch (method.Bound.Type)
        {
            case MethodType.ClientStreaming when !streamsItems:
                AsyncClientStreamingCall<Frame, Frame> upload = invoker.Channel.AsyncClientStreamingCall(method.Bound, null, options);
                _call = upload;
                Responses = new OneResponse(upload.ResponseAsync);
                _writing = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
                _writer = WriteRequestAsync(upload.RequestStream, _writing.Token);
                return;
            case MethodType.Unary or MethodType.ClientStreaming or MethodType.ServerStreaming:
                throw new InvalidOperationException($"{method.Bound.FullName} is bound as {method.Bound.Type} but its request carries {(streamsItems ? "a streamed argument" : "buffers")}: the contract's generated code and the method's shape disagree.");
        }

        AsyncDuplexStreamingCall<Frame, Frame> duplex = invoker.Channel.AsyncDuplexStreamingCall(method.Bound, null, options);
        _call = duplex;
        Responses = duplex.ResponseStream;
        if (streamsItems)
        {
            _items = Channel.CreateUnbounded<OutgoingMessage>(new UnboundedChannelOptions { SingleReader = false, SingleWriter = true });
            Outbox = new StreamOutbox();
            Outbox.Attach(this);
        }

        _writing = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        _writer = WriteRequestAsync(duplex.RequestStream, _writing.Token);
    }

    /// <summary>
    /// The call's options: its metadata block as the binary header (the caller's identity is not sent: a
    /// server could not verify it anyway), its deadline as gRPC's own, and its token.
    /// </summary>
    internal static CallOptions OptionsOf(in GrpcCallMetadata metadata, CancellationToken cancellationToken) =>
        new(metadata.Header is { } header ? new Metadata { { GrpcWire.MetadataHeader, header } } : null, metadata.Deadline, cancellationToken);

    /// <summary>Starts the call of <paramref name="method"/>; <paramref name="message"/> is the call's until it is disposed.</summary>
    public static GrpcClientCall Start(GrpcInvoker invoker, GrpcMethod method, OutgoingMessage message, in GrpcCallMetadata metadata, bool streamsItems, CancellationToken cancellationToken) =>
        new(invoker, method, message, metadata, streamsItems, cancellationToken);

    /// <summary>The deadline the call's metadata set (gRPC's own deadline too), or null.</summary>
    public DateTime? Deadline { get; }

    /// <summary>Credit and items of the streamed argument (null: the method takes none).</summary>
    public StreamOutbox? Outbox { get; }

    public IAsyncStreamReader<Frame> Responses { get; }

    /// <summary>
    /// Reads the next message the server sends (an item or the reply) into <paramref name="assembler"/>,
    /// giving credit frames to the outbox on the way. False when the server ended the call before a whole message.
    /// </summary>
    public async ValueTask<bool> ReadMessageAsync(MessageAssembler assembler, CancellationToken cancellationToken)
    {
        while (await NextAsync(cancellationToken).ConfigureAwait(false))
        {
            Frame frame = Responses.Current;
            if (frame.Kind == FrameKind.Credit)
            {
                int credit = Frame.ReadCredit(frame);
                if (Outbox is null || !Outbox.Grant(credit))
                {
                    throw new ProtocolViolationException($"The server granted credit of {credit} items to a call without a streamed argument, or beyond any window.");
                }

                continue;
            }

            if (assembler.Accept(frame))
            {
                return true;
            }

            assembler.ReceiveInPlace(); // the buffers' frames go straight into their leases (for the rest of this method)
        }

        return false;
    }

    /// <summary>
    /// Reads the end of the call after its reply (the server ends it right after): disposing a call whose
    /// status has not arrived would cancel it, a reset stream and an exception on both sides per call.
    /// </summary>
    public async ValueTask ReadEndAsync(CancellationToken cancellationToken)
    {
        if (await NextAsync(cancellationToken).ConfigureAwait(false))
        {
            Responses.Current.Release();
            throw new ProtocolViolationException("The server sent a frame after its reply.");
        }
    }

    /// <summary>The next response message; notes when the call's status came from the server (<see cref="_ended"/>), whatever it was.</summary>
    private async ValueTask<bool> NextAsync(CancellationToken cancellationToken)
    {
        try
        {
            bool more = await Responses.MoveNext(cancellationToken).ConfigureAwait(false);
            _ended |= !more;
            return more;
        }
        catch (RpcException rpc) when (rpc.StatusCode is not (StatusCode.Cancelled or StatusCode.Unavailable or StatusCode.DeadlineExceeded) && rpc.Status.DebugException is null)
        {
            _ended = true; // a status the server sent (a fault, a refusal): it has ended the call
            throw;
        }
    }

    /// <summary>The server ended the call (its status arrived): a write still under way is its to stop (<see cref="DisposeAsync"/>).</summary>
    private bool _ended;

    /// <summary>How long <see cref="DisposeAsync"/> lets a write under way end on its own after the server ended the call.</summary>
    private static readonly TimeSpan WriterGrace = TimeSpan.FromSeconds(5);

    /// <summary>The request's frames, then (with a streamed argument) each item as the pump queues it, then the end or the fault.</summary>
    private async Task WriteRequestAsync(IClientStreamWriter<Frame> requests, CancellationToken cancellationToken)
    {
        try
        {
            foreach (Frame frame in _message.Frames())
            {
                await requests.WriteAsync(frame, cancellationToken).ConfigureAwait(false);
            }

            if (_items is not null)
            {
                while (await _items.Reader.WaitToReadAsync(cancellationToken).ConfigureAwait(false))
                {
                    while (_items.Reader.TryRead(out OutgoingMessage? item))
                    {
                        using (item)
                        {
                            foreach (Frame frame in item.Frames(FrameKind.ItemHead))
                            {
                                await requests.WriteAsync(frame, cancellationToken).ConfigureAwait(false);
                            }
                        }
                    }
                }

                if (Volatile.Read(ref _fault) is { } fault)
                {
                    await requests.WriteAsync(Frame.Fault(fault), cancellationToken).ConfigureAwait(false);
                }
            }

            await requests.CompleteAsync().ConfigureAwait(false);
        }
        catch (RpcException ex) when (ex.StatusCode == StatusCode.ResourceExhausted)
        {
            // gRPC refused a frame above the channel's send limit before it went out. The call has not ended:
            // the server would wait for the rest of the request and this side for the reply, for ever. It
            // ends here, failed with the refusal (Translate), its unsent items given back.
            Volatile.Write(ref _refused, ex);
            DiscardItems();
            _call.Dispose();
        }
        catch (Exception ex) when (ex is RpcException or OperationCanceledException or InvalidOperationException or IOException or ObjectDisposedException)
        {
            // The call ended (answered, cancelled, or the server went away): its status says how; unsent items go back.
            DiscardItems();
        }
    }

    void IStreamItemSink.SendItem(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken)
    {
        OutgoingMessage item = OutgoingMessage.Create(body, payloads); // at most the server's window of these wait here
        if (!_items!.Writer.TryWrite(item))
        {
            item.Dispose();
            throw new OperationCanceledException("The call has ended: its streamed argument is not sent any more.");
        }
    }

    void IStreamItemSink.End() => _items!.Writer.TryComplete();

    void IStreamItemSink.Fail(Exception exception)
    {
        Volatile.Write(ref _fault, exception);
        _items!.Writer.TryComplete();
    }

    private void DiscardItems()
    {
        if (_items is null)
        {
            return;
        }

        _items.Writer.TryComplete();
        while (_items.Reader.TryRead(out OutgoingMessage? left))
        {
            left.Dispose();
        }
    }

    /// <summary>
    /// Ends the call (cancelling it on the server when it is still running) and gives the request's memory
    /// back once the writer has let go of it. The writer stops before the call is disposed, never during:
    /// disposing a call whose request is still going out resets its HTTP/2 stream, and a reset sent while a
    /// write is under way can go out ahead of that write's DATA frame, which Kestrel answers by closing the
    /// whole connection (a protocol error), every other call on it included. A server that answered before
    /// it read all of the request (a method that returned before the last item of its streamed argument, a
    /// call refused midway) stops the sending itself once it has ended the call (RST_STREAM NO_ERROR), which
    /// ends such a write with no reset of this side; it is given a moment for that.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        DiscardItems(); // a writer waiting for the next item ends the request
        if (_writer is not null)
        {
            if (_ended && !_writer.IsCompleted)
            {
                await _writer.WaitAsync(WriterGrace).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
            }

            _writing!.Cancel(); // a write the server will never take (it answered or failed first) stops waiting for window
            await _writer.ConfigureAwait(false); // never throws
            _writing.Dispose();
        }

        _call.Dispose();
        _head?.Release(); // a write of it still under way gives it back when done
        _message.Dispose();
    }

    /// <summary>gRPC's outcome as this library's exception (<see cref="GrpcInvoker.Translate"/>); a request gRPC refused to send ends the call whatever the reader saw.</summary>
    public Exception Translate(Exception ex, MethodDescriptor method, CancellationToken cancellationToken) =>
        Volatile.Read(ref _refused) is { } refused
            ? GrpcInvoker.ResourceExhausted(refused, method)
            : _invoker.Translate(ex, method, Deadline, cancellationToken);
}

/// <summary>The one response of a client-streaming call, read as a stream of one frame.</summary>
internal sealed class OneResponse(Task<Frame> response) : IAsyncStreamReader<Frame>
{
    private bool _read;

    public Frame Current { get; private set; } = null!;

    public async Task<bool> MoveNext(CancellationToken cancellationToken)
    {
        if (_read)
        {
            return false;
        }

        _read = true;
        Current = await response.WaitAsync(cancellationToken).ConfigureAwait(false);
        return true;
    }
}

/// <summary>
/// What a call sends besides its request: the metadata block (headers, deadline, trace context) as the
/// binary header, and the deadline again as gRPC's own, taken from the caller's context rather than
/// decoded back out of the block.
/// </summary>
internal readonly struct GrpcCallMetadata
{
    private GrpcCallMetadata(byte[] header, DateTime? deadline)
    {
        Header = header;
        Deadline = deadline;
    }

    /// <summary>The encoded block, or null when the call has no headers, deadline or trace context.</summary>
    public byte[]? Header { get; }

    /// <summary>The deadline (UTC), no later than the block's longest (<see cref="CallMetadata.MaxDeadline"/>), or null.</summary>
    public DateTime? Deadline { get; }

    public static GrpcCallMetadata Of(in OutgoingMetadata metadata)
    {
        if (metadata.IsEmpty)
        {
            return default;
        }

        var block = new ArrayBufferWriter<byte>(128);
        metadata.Encode(block);
        DateTime? deadline = null;
        if (metadata.Deadline is { } due) // UTC, as Grpc.Net.Client requires: ClientInterceptorContext.Deadline makes it so
        {
            DateTime now = DateTime.UtcNow;
            deadline = due - now > CallMetadata.MaxDeadline ? now + CallMetadata.MaxDeadline : due;
        }

        return new GrpcCallMetadata(block.WrittenSpan.ToArray(), deadline);
    }
}
