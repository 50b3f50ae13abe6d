using global::Grpc.Core;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>A request that came over gRPC, as the dispatcher and the generated stub see it.</summary>
internal sealed class GrpcInboundCall : IInboundCall, IGrpcPeer, IDisposable
{
    /// <summary>What the call's cancellation is once the call is disposed: already cancelled, never disposed.</summary>
    private static readonly CancellationTokenSource Ended = CancelledSource();

    private ReceivedRequest _message; // mutable: it notes which payloads were taken
    private readonly ServerCallContext _context;
    private readonly System.Net.Sockets.Socket? _socket;
    private CancellationTokenSource? _cancellation;
    private PeerCredentials? _peer;
    private readonly byte[]? _metadata;
    private readonly IAsyncStreamReader<Frame>? _requests;
    private readonly IServerStreamWriter<Frame>? _responses;
    private readonly int _window;
    private readonly int _maxBodyBytes;
    private readonly LeaseBudget? _budget;
    private OutgoingMessage? _reply;
    private Frame? _replyHead;
    private StreamOutbox? _outbox;
    private System.Threading.Channels.Channel<Outgoing>? _outgoing;
    private Task? _writer;

    /// <summary>What the response writer sends before the reply: an item of the streamed result, or credit for the streamed argument.</summary>
    private readonly record struct Outgoing(OutgoingMessage? Item, int Credit);

    /// <param name="requests">The request stream after the request (null: the method is bound with one request message).</param>
    /// <param name="responses">The response stream (null: the method is bound with one response message, written by gRPC).</param>
    /// <param name="request">The request's metadata block and connection (<see cref="InboundRequest.Of"/>), default when there is no HTTP request behind the call.</param>
    /// <param name="budget">What the leases of the request's buffers and a streamed argument's items count against (null: only the process's mapping cap).</param>
    public GrpcInboundCall(int methodId, ReceivedRequest message, ServerCallContext context, InboundRequest request, IAsyncStreamReader<Frame>? requests, IServerStreamWriter<Frame>? responses, int window, int maxBodyBytes, LeaseBudget? budget = null)
    {
        _budget = budget;
        MethodId = methodId;
        _message = message;
        _requests = requests;
        _responses = responses;
        _window = window;
        _maxBodyBytes = maxBodyBytes;
        _context = context;
        _metadata = request.Metadata;
        _socket = request.Socket;
    }

    public int MethodId { get; }

    public ReadOnlyMemory<byte> BodyMemory => _message.Body;

    public int PayloadCount => _message.PayloadCount;

    /// <summary>The call's token (<see cref="Cancellation"/>); the ended call's cancelled one once the call is disposed.</summary>
    public CancellationToken CancellationToken
    {
        get
        {
            CancellationTokenSource source = Cancellation;
            try
            {
                return source.Token;
            }
            catch (ObjectDisposedException)
            {
                return Ended.Token; // Dispose disposed the source between the read and here: the call has ended
            }
        }
    }

    /// <summary>
    /// The caller's cancellation (the request aborted) and the deadline: made on first use, most calls never
    /// ask. Asked after the call was disposed (a writer failing late, a token kept past the call), it is
    /// <see cref="Ended"/>: a source linked then to the request's token would outlive the call.
    /// </summary>
    private CancellationTokenSource Cancellation
    {
        get
        {
            if (Volatile.Read(ref _cancellation) is { } made)
            {
                return made;
            }

            var linked = CancellationTokenSource.CreateLinkedTokenSource(_context.CancellationToken);
            if (Interlocked.CompareExchange(ref _cancellation, linked, null) is { } other)
            {
                linked.Dispose();
                return other;
            }

            return linked;
        }
    }

    /// <summary>
    /// The calling process, when the kernel vouches for it: over a Unix socket, SO_PEERCRED of the
    /// connection (the process at the other end of the socket, a proxy if one is in between). Over TCP
    /// unknown (-1): the caller may be on another host, and whatever it might claim in a header is not
    /// reported as its identity.
    /// </summary>
    public int PeerProcessId => Peer.ProcessId;

    /// <summary>The calling process's user id, as <see cref="PeerProcessId"/>: <see cref="uint.MaxValue"/> when unknown.</summary>
    public uint PeerUserId => Peer.UserId;

    /// <summary>Read on first use (most calls never ask), once per connection; after the call too, while its connection is open.</summary>
    private PeerCredentials Peer => _peer ??= PeerCredentials.Of(_socket);

    public bool HasMetadata => _metadata is not null;

    public ReadOnlyMemory<byte> Metadata => _metadata;

    public long PayloadBytes => _message.PayloadBytes;

    /// <summary>The call broke the protocol (arguments that do not decode): answered with status Internal.</summary>
    public ProtocolViolationException? Violation { get; private set; }

    public bool IsPayloadTaken(int index) => _message.IsTaken(index);

    public SharedBuffer TakePayload(int index) => _message.Take(index, _budget) ?? throw new ProtocolViolationException($"The request names payload {index} twice.");

    /// <summary>An array argument received straight into its array (<see cref="MethodDescriptor.ArrayArgument"/>), now the method's.</summary>
    public bool TryTakeArray<T>(int index, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out T[]? array)
        where T : unmanaged => _message.TryTakeArray(index, out array);

    /// <summary>A payload that rode in the request's one frame is lent in place (no lease, no copy) until the call is disposed.</summary>
    public bool TryLendPayload(int index, out Memory<byte> bytes) => _message.TryLend(index, out bytes);

    public Stream OpenPayloadStream(int index, CancellationToken cancellationToken) => new LeaseStream(TakePayload(index));

    /// <summary>The request stream's frames after the request: the items of the streamed argument, read as the method asks for them.</summary>
    internal IAsyncStreamReader<Frame> Requests => _requests ?? throw new InvalidOperationException("The method is bound with one request message: it has no streamed argument to read.");

    internal int Window => _window;

    internal int MaxBodyBytes => _maxBodyBytes;

    /// <summary>What the leases of a streamed argument's items count against.</summary>
    internal LeaseBudget? Budget => _budget;

    public IAsyncEnumerable<T> ReadItems<T>(ReplyDecoder<T> decoder, SerializerOptionsSource options)
    {
        var items = new GrpcArgumentStream<T>(this, decoder, options);
        _argument = items; // its current item goes back with the call, should the method not dispose its enumerator
        return items;
    }

#pragma warning disable CA1859 // a GrpcArgumentStream<T> of any T: the interface is the one type they share
    private IDisposable? _argument;
#pragma warning restore CA1859

    /// <summary>Lets the client send <paramref name="items"/> more items of its streamed argument (ignored once the call is answered).</summary>
    internal void SendCredit(int items) => Writer().TryWrite(new Outgoing(null, items));

    /// <summary>Ordinary memory of this process: over gRPC a returned lease is copied into the reply.</summary>
    public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) => LocalLeases.Instance.Rent(bytes);

    public void Reply(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads)
    {
        if (_reply is not null || _replyHead is not null)
        {
            throw new InvalidOperationException("The call was already answered.");
        }

        if (_responses is null && OutgoingMessage.IsInline(payloads))
        {
            // Bound with one response message, which gRPC writes after the method returned: the frame alone,
            // given back once written (or when the call is disposed unanswered).
            _replyHead = OutgoingMessage.HeadFrame(body, payloads, releaseAfterWrite: true);
            return;
        }

        _reply = OutgoingMessage.Create(body, payloads);
    }

    /// <summary>The one-frame reply made and not taken yet (a test reads it).</summary>
    internal Frame? PendingReplyHead => _replyHead;

    /// <summary>The reply as its one frame, when the stub's reply was one frame of a method bound with one response message (null: see <see cref="TakeReply"/>).</summary>
    public Frame? TakeReplyHead()
    {
        Frame? head = _replyHead;
        _replyHead = null;
        return head;
    }

    /// <summary>The reply the stub made (a call without one gets an empty reply).</summary>
    public OutgoingMessage TakeReply()
    {
        OutgoingMessage reply = _reply ?? OutgoingMessage.EmptyReply;
        _reply = null;
        return reply;
    }

    public void AbortConnection(ProtocolViolationException violation) => Violation ??= violation;

    /// <summary>
    /// Credit for a streamed result: the window at first, one more each time an item has been written to
    /// the gRPC stream (whose HTTP/2 flow control holds the writer back while the caller does not read).
    /// </summary>
    public StreamOutbox Outbox
    {
        get
        {
            if (Volatile.Read(ref _outbox) is { } made)
            {
                return made;
            }

            lock (this) // made once, whichever comes first of the result's producer and a consumer of the streamed argument (GrpcInboundCall is never handed out)
            {
                if (_outbox is null)
                {
                    var outbox = new StreamOutbox();
                    outbox.Grant(_window);
                    Writer();
                    Volatile.Write(ref _outbox, outbox);
                }

                return _outbox;
            }
        }
    }

    /// <summary>
    /// The one writer of the response stream before the reply (gRPC takes one write at a time), started on
    /// first use by the result's producer or by the streamed argument's consumer, which may run on two
    /// threads at once: started once, and published only with its task, which <see cref="FinishItemsAsync"/> awaits.
    /// </summary>
    private System.Threading.Channels.ChannelWriter<Outgoing> Writer()
    {
        if (Volatile.Read(ref _outgoing) is { } made)
        {
            return made.Writer;
        }

        lock (this)
        {
            if (_outgoing is null)
            {
                if (_responses is null)
                {
                    throw new InvalidOperationException("The method is bound with one response message: it has no stream to write items or credit on.");
                }

                var outgoing = System.Threading.Channels.Channel.CreateUnbounded<Outgoing>(new() { SingleReader = true });
                _writer = WriteAsync(outgoing.Reader);
                Volatile.Write(ref _outgoing, outgoing);
            }

            return _outgoing.Writer;
        }
    }

    /// <summary>Copies the item (its leases are taken over) and queues it for the writer: never more than the window are queued.</summary>
    public void SendStreamItem(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken)
    {
        _ = Outbox;
        OutgoingMessage item = OutgoingMessage.Create(body, payloads);
        if (!_outgoing!.Writer.TryWrite(new Outgoing(item, 0)))
        {
            item.Dispose();
            throw new OperationCanceledException("The stream's writer has stopped.");
        }
    }

    private async Task WriteAsync(System.Threading.Channels.ChannelReader<Outgoing> outgoing)
    {
        try
        {
            await foreach (Outgoing next in outgoing.ReadAllAsync().ConfigureAwait(false))
            {
                if (next.Item is not { } item)
                {
                    await _responses!.WriteAsync(Frame.Credit(next.Credit), CancellationToken).ConfigureAwait(false);
                    continue;
                }

                using (item)
                {
                    foreach (Frame frame in item.Frames(FrameKind.ItemHead))
                    {
                        await _responses!.WriteAsync(frame, CancellationToken).ConfigureAwait(false);
                    }
                }

                _outbox!.Grant(1);
            }
        }
        catch
        {
            try
            {
                Cancellation.Cancel(); // the caller is gone or the write failed: the producer stops at its next credit wait
            }
            catch (ObjectDisposedException)
            {
                // the call was disposed meanwhile: it has ended, and its producer with it
            }

            DrainOutgoing(); // and an item it still queues is refused (and given back) by the closed channel
            throw;
        }
    }

    /// <summary>Closes the queue of items and credit and gives back the items in it: nothing written after is kept.</summary>
    private void DrainOutgoing()
    {
        if (_outgoing is not { } outgoing)
        {
            return;
        }

        outgoing.Writer.TryComplete();
        while (outgoing.Reader.TryRead(out Outgoing left))
        {
            left.Item?.Dispose();
        }
    }

    /// <summary>Whether the call started its response writer (items of a streamed result, or credit for a streamed argument), which <see cref="FinishItemsAsync"/> then has to finish.</summary>
    public bool HasResponseWriter => _outgoing is not null;

    /// <summary>Waits for the items and credit already queued to be written (before the reply or the fault, which end the call).</summary>
    public async Task FinishItemsAsync()
    {
        if (Volatile.Read(ref _outgoing) is not { } outgoing)
        {
            return;
        }

        outgoing.Writer.TryComplete();
        await _writer!.ConfigureAwait(false); // set before the channel was published
    }

    /// <summary>
    /// The call's deadline. Our client sends it as gRPC's own too (grpc-timeout), and Grpc.AspNetCore then
    /// cancels the request at it, which the call's token follows: a second timer only for a caller that set none.
    /// </summary>
    public void CancelAfter(TimeSpan delay)
    {
        if (_context.Deadline == DateTime.MaxValue)
        {
            try
            {
                Cancellation.CancelAfter(delay);
            }
            catch (ObjectDisposedException)
            {
                // disposed with the call while this ran: an ended call needs no timer
            }
        }
    }

    public void Dispose()
    {
        _reply?.Dispose();
        _reply = null;
        _replyHead?.Release(); // a reply made but never returned to gRPC (the call failed after it)
        _replyHead = null;
        _argument?.Dispose();
        if (_writer is null || _writer.IsCompleted)
        {
            DrainOutgoing(); // items the writer never took (a producer that ran past a failed write)
        }
        else
        {
            _outgoing?.Writer.TryComplete(); // the writer, still running, writes or gives back what is queued
        }

        _message.Dispose();
        CancellationTokenSource? cancellation = Interlocked.Exchange(ref _cancellation, Ended);
        if (cancellation != Ended)
        {
            cancellation?.Dispose();
        }
    }

    private static CancellationTokenSource CancelledSource()
    {
        var source = new CancellationTokenSource();
        source.Cancel();
        return source;
    }
}

/// <summary>Who is at the other end of a gRPC connection, as the kernel says (Unix sockets only), kept with the connection's socket.</summary>
internal sealed class PeerCredentials(int processId, uint userId)
{
    /// <summary>One reading per connection, however many of its streams ask at once (the table is thread-safe and lets go of closed sockets).</summary>
    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<System.Net.Sockets.Socket, PeerCredentials> Known = new();

    public static readonly PeerCredentials Unknown = new(-1, uint.MaxValue);

    public int ProcessId { get; } = processId;

    public uint UserId { get; } = userId;

    public static PeerCredentials Of(System.Net.Sockets.Socket? socket) =>
        socket is { AddressFamily: System.Net.Sockets.AddressFamily.Unix } ? Known.GetValue(socket, Read) : Unknown;

    private static PeerCredentials Read(System.Net.Sockets.Socket socket)
    {
        try
        {
            Span<byte> ucred = stackalloc byte[12]; // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
            int length = socket.GetRawSocketOption(Interop.LinuxNative.SOL_SOCKET, Interop.LinuxNative.SO_PEERCRED, ucred);
            int pid = System.Buffers.Binary.BinaryPrimitives.ReadInt32LittleEndian(ucred);

            // pid 0: a caller in a process namespace this one cannot see (its uid is still the kernel's word), as over shared memory.
            return length < 12 || pid < 0 ? Unknown : new PeerCredentials(pid, System.Buffers.Binary.BinaryPrimitives.ReadUInt32LittleEndian(ucred[4..]));
        }
        catch (Exception ex) when (ex is System.Net.Sockets.SocketException or ObjectDisposedException)
        {
            return Unknown; // the connection is gone: nobody to vouch for
        }
    }
}

/// <summary>
/// What a served call takes from its HTTP request while the request is live (its HttpContext is gone
/// after the call): the metadata block, and the connection's socket for <see cref="PeerCredentials"/>.
/// </summary>
internal readonly record struct InboundRequest(byte[]? Metadata, System.Net.Sockets.Socket? Socket)
{
    /// <summary>
    /// Read before the request's frames, so a call whose metadata header is not base64 is refused before
    /// its buffers are read (status InvalidArgument). The socket is there when the transport exposes it
    /// (Kestrel's socket transport does).
    /// </summary>
    public static InboundRequest Of(ServerCallContext context)
    {
        Microsoft.AspNetCore.Http.HttpContext http = context.GetHttpContext();
        return new(MetadataOf(http), http.Features.Get<Microsoft.AspNetCore.Connections.Features.IConnectionSocketFeature>()?.Socket);
    }

    /// <summary>
    /// The request's metadata block, read from the one HTTP header that carries it: asking gRPC for
    /// <see cref="ServerCallContext.RequestHeaders"/> would build a collection of every header per call.
    /// </summary>
    private static byte[]? MetadataOf(Microsoft.AspNetCore.Http.HttpContext http)
    {
        if (http.Request.Headers.TryGetValue(GrpcWire.MetadataHeader, out Microsoft.Extensions.Primitives.StringValues values) && values.Count > 0 && values[0] is { } base64)
        {
            int padding = (4 - (base64.Length % 4)) % 4; // gRPC allows unpadded base64 in -bin headers
            try
            {
                return Convert.FromBase64String(padding == 0 ? base64 : base64 + new string('=', padding));
            }
            catch (FormatException ex)
            {
                throw new RpcException(new Status(StatusCode.InvalidArgument, $"The {GrpcWire.MetadataHeader} header is not base64: {ex.Message}"));
            }
        }

        return null;
    }
}

/// <summary>
/// A served call's request: one received frame that is the whole message (most small calls: no payloads,
/// or payloads that ride in the frame, lent in place or copied into a lease when taken), or the message
/// assembled from its frames.
/// </summary>
internal struct ReceivedRequest
{
    private Frame? _whole;
    private MessageAssembler? _assembled;
    private readonly int _wholePayloads;
    private readonly long _wholePayloadBytes;

    /// <summary>The payloads of the whole frame lent or taken (one bit each: at most <see cref="Frame.MaxPayloads"/>).</summary>
    private ulong _taken;

    /// <param name="whole">A frame that is a whole message of <paramref name="payloads"/> payloads (<see cref="Frame.WholeMessagePayloads"/>).</param>
    public ReceivedRequest(Frame whole, int payloads)
    {
        _whole = whole;
        _wholePayloads = payloads;
        _wholePayloadBytes = whole.WholePayloadBytes;
    }

    public ReceivedRequest(MessageAssembler assembled) => _assembled = assembled;

    public static implicit operator ReceivedRequest(MessageAssembler assembled) => new(assembled);

    /// <summary>The body; empty once the request is disposed (as an assembled message's).</summary>
    public readonly ReadOnlyMemory<byte> Body => _whole is { } whole ? whole.WholeBody : _assembled?.Body ?? default;

    public readonly int PayloadCount => _assembled?.PayloadCount ?? _wholePayloads;

    /// <summary>The bytes of every payload together, as the head announced them (after the request is disposed too).</summary>
    public readonly long PayloadBytes => _assembled?.PayloadBytes ?? _wholePayloadBytes;

    public readonly bool IsTaken(int index) => _assembled?.IsTaken(index) ?? (_taken & (1UL << index)) != 0;

    /// <summary>Payload <paramref name="index"/> (not taken, in range) in the frame's own memory, until the request is disposed; false when the message was assembled.</summary>
    public bool TryLend(int index, out Memory<byte> bytes)
    {
        if (_whole is null)
        {
            bytes = default;
            return false;
        }

        _taken |= 1UL << index;
        bytes = _whole.WholePayload(index);
        return true;
    }

    /// <summary>Payload <paramref name="index"/>, now the caller's (a payload of the whole frame copied into a lease counted against <paramref name="budget"/>); null when taken already.</summary>
    public SharedBuffer? Take(int index, LeaseBudget? budget)
    {
        if (_assembled is { } assembled)
        {
            return assembled.Take(index);
        }

        if (_whole is null || (_taken & (1UL << index)) != 0)
        {
            return null; // taken already, or asked for after the request was disposed
        }

        Memory<byte> bytes = _whole.WholePayload(index);
        SharedBuffer lease = LeaseBudget.Rent(budget, bytes.Length);
        _taken |= 1UL << index; // taken once its lease is made: a refused one can be asked for again
        bytes.Span.CopyTo(lease.Span);
        return lease;
    }

    /// <summary>Payload <paramref name="index"/> as the array it was received into (an assembled request's one array argument); false otherwise.</summary>
    public readonly bool TryTakeArray<T>(int index, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out T[]? array)
        where T : unmanaged
    {
        if (_assembled is { } assembled)
        {
            return assembled.TryTakeArray(index, out array);
        }

        array = null;
        return false;
    }

    /// <summary>Gives the frame's buffer (or the assembled message) back; what is read after is empty.</summary>
    public void Dispose()
    {
        _whole?.Release();
        _whole = null;
        _assembled?.Dispose();
    }
}
