using System.Buffers;
using System.Buffers.Binary;
using global::Grpc.Core;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>What a gRPC message of this transport is.</summary>
internal enum FrameKind : byte
{
    /// <summary>Starts a message (request, reply or stream item): body, payload lengths, then payload bytes that fit.</summary>
    Head = 0,

    /// <summary>The next bytes of the current message's payloads, in order.</summary>
    Data = 1,

    /// <summary>Starts an item of a streamed result or argument (laid out as <see cref="Head"/>); the reply's head, or the end of the request stream, ends the stream.</summary>
    ItemHead = 2,

    /// <summary>The receiver of a streamed argument lets the client send [u32] more items (the window at first, then as it consumes).</summary>
    Credit = 3,

    /// <summary>The client's enumerable of a streamed argument threw: the exception, as the shared-memory fault encodes it; the server's enumeration throws it.</summary>
    Fault = 4,
}

/// <summary>
/// One gRPC message: a kind byte, then the head or a chunk of payload bytes. A request, a reply and a
/// stream item are each one head frame followed by as many data frames as their payloads need, none
/// larger than <see cref="Frame.ChunkBytes"/>; so no message nears gRPC's 4 MB default limit.
/// Head: [u32 body length][body][u16 payload count][i64 length per payload][payload bytes that fit].
/// </summary>
internal sealed class Frame : IReplySource
{
    /// <summary>The most payload bytes one frame carries.</summary>
    public const int ChunkBytes = 1 << 20;

    /// <summary>The smallest gRPC message limit the transport works with: a data frame is its kind byte and up to <see cref="ChunkBytes"/> bytes.</summary>
    public const int MinMessageLimit = 1 + ChunkBytes;

    /// <summary>Payloads this small together ride in the head frame.</summary>
    public const int InlineBytes = 64 << 10;

    /// <summary>The most buffers a message carries, as over shared memory (a request has one per buffer argument).</summary>
    public const int MaxPayloads = TransportProtocol.MaxPayloadsPerMessage;

    /// <summary>The largest frame: a head with a body at the options' largest (16 MiB by default) and its payload lengths.</summary>
    public const int MaxFrameBytes = 64 << 20;

    private byte[]? _rented;

    /// <summary>The budget this received frame's buffer (all of it) counts against until it goes back (<see cref="ChargeTo"/>).</summary>
    private LeaseBudget? _budget;

    /// <summary>An outgoing frame over pooled memory: <see cref="Writing"/> while gRPC serializes it, <see cref="Released"/> once its owner let go.</summary>
    private int _state;

    private const int Idle = 0;
    private const int Writing = 1;
    private const int Released = 2;

    /// <summary>An outgoing frame that owns its pooled buffer (<see cref="Owning"/>).</summary>
    private readonly bool _owning;

    /// <summary>The frame gives its buffer back once gRPC has written it (a unary reply: gRPC writes it after the method returned).</summary>
    private readonly bool _releaseAfterWrite;

    public Frame(FrameKind kind, ReadOnlyMemory<byte> first, ReadOnlyMemory<byte> second = default, byte[]? rented = null)
    {
        Kind = kind;
        First = first;
        Second = second;
        _rented = rented;
    }

    private Frame(FrameKind kind, ReadOnlyMemory<byte> first, byte[] rented, bool releaseAfterWrite)
        : this(kind, first, default, rented)
    {
        _owning = true;
        _releaseAfterWrite = releaseAfterWrite;
    }

    /// <summary>
    /// An outgoing frame that owns <paramref name="rented"/>: with <paramref name="releaseAfterWrite"/> it
    /// gives it back once written, otherwise when <see cref="Release"/> is called; if gRPC is serializing
    /// it at that moment, the serializer gives it back when done (a call that failed before or while its
    /// request was written cannot know whether gRPC still holds the frame).
    /// </summary>
    public static Frame Owning(FrameKind kind, byte[] rented, int length, bool releaseAfterWrite) =>
        new(kind, rented.AsMemory(0, length), rented, releaseAfterWrite);

    public FrameKind Kind { get; }

    /// <summary>The frame's bytes after the kind byte: <see cref="First"/> then <see cref="Second"/>.</summary>
    public ReadOnlyMemory<byte> First { get; }

    public ReadOnlyMemory<byte> Second { get; }

    public int Length => 1 + First.Length + Second.Length;

    /// <summary>The frame's owner let go of it (<see cref="Release"/>), whether or not its buffer is back yet.</summary>
    internal bool IsReleased => Volatile.Read(ref _state) == Released;

    /// <summary>Gives the frame's pooled buffer back (idempotent); an outgoing frame that gRPC is writing gives it back when written.</summary>
    public void Release()
    {
        if (Interlocked.Exchange(ref _state, Released) == Writing)
        {
            return; // the serializer sees Released when it is done and gives the buffer back then
        }

        ReturnBuffer();
    }

    private void ReturnBuffer()
    {
        if (Interlocked.Exchange(ref _rented, null) is { } rented)
        {
            ArrayPool<byte>.Shared.Return(rented);
            if (_budget is { } budget) // only the thread that took the buffer above gets here
            {
                _budget = null;
                budget.Release(rented.Length);
            }
        }
    }

    /// <summary>
    /// Counts this received frame's buffer against <paramref name="budget"/> until the frame is released: a
    /// request's head kept while its call runs, which a peer may make as large as a message (MaxMessageBytes)
    /// or more. A frame whose buffer is at most <see cref="InlineBytes"/> counts nothing (every small call);
    /// a frame counted already is not counted again. <see cref="ArenaExhaustedException"/> when there is no room (the frame is the caller's still).
    /// </summary>
    public void ChargeTo(LeaseBudget budget)
    {
        if (IsChargeable)
        {
            budget.Reserve(_rented!.Length, "a request frame");
            _budget = budget;
        }
    }

    /// <summary>Whether <see cref="ChargeTo"/> would count this frame: a received buffer above <see cref="InlineBytes"/>, not counted yet.</summary>
    public bool IsChargeable => _rented is { Length: > InlineBytes } && _budget is null;

    /// <summary>Whether this received frame is a whole message without payloads (most small replies): it is then its own reply (<see cref="IReplySource"/>).</summary>
    public bool IsWholeMessage(int maxBodyBytes) => WholeMessagePayloads(maxBodyBytes) == 0;

    /// <summary>
    /// How many payloads this received frame carries when it is a whole message (most small requests): a
    /// head of [u32 body length][body][u16 count][i64 length per payload] whose payloads' bytes are all the
    /// rest of it, the body within <paramref name="maxBodyBytes"/>, at most <see cref="MaxPayloads"/>
    /// payloads. -1 when it is not: such a message goes through a <see cref="MessageAssembler"/>, which also
    /// names what is wrong with it.
    /// </summary>
    public int WholeMessagePayloads(int maxBodyBytes)
    {
        ReadOnlySpan<byte> head = First.Span;
        if (Kind != FrameKind.Head || head.Length < 6 || !Second.IsEmpty)
        {
            return -1;
        }

        uint bodyLength = BinaryPrimitives.ReadUInt32LittleEndian(head);
        if (bodyLength > (uint)maxBodyBytes || bodyLength > (uint)(head.Length - 6))
        {
            return -1;
        }

        int position = 4 + (int)bodyLength;
        int count = BinaryPrimitives.ReadUInt16LittleEndian(head[position..]);
        position += 2;
        if (count > MaxPayloads || head.Length - position < 8 * count)
        {
            return -1;
        }

        long rest = head.Length - position - (8L * count);
        for (int i = 0; i < count; i++)
        {
            long length = BinaryPrimitives.ReadInt64LittleEndian(head[(position + (8 * i))..]);
            if (length < 0 || length > rest)
            {
                return -1;
            }

            rest -= length;
        }

        return rest == 0 ? count : -1;
    }

    /// <summary>The body of a whole message (<see cref="WholeMessagePayloads"/>).</summary>
    public ReadOnlyMemory<byte> WholeBody => First.Slice(4, (int)BinaryPrimitives.ReadUInt32LittleEndian(First.Span));

    /// <summary>Payload <paramref name="index"/> of a whole message, in the frame's own buffer (valid until the frame is released).</summary>
    public Memory<byte> WholePayload(int index)
    {
        ReadOnlySpan<byte> lengths = WholePayloadLengths(out int offset);
        for (int i = 0; i < index; i++)
        {
            offset += (int)BinaryPrimitives.ReadInt64LittleEndian(lengths[(8 * i)..]);
        }

        int length = (int)BinaryPrimitives.ReadInt64LittleEndian(lengths[(8 * index)..]);
        return System.Runtime.InteropServices.MemoryMarshal.AsMemory(First.Slice(offset, length));
    }

    /// <summary>The bytes of every payload of a whole message together.</summary>
    public long WholePayloadBytes
    {
        get
        {
            WholePayloadLengths(out int payloads);
            return First.Length - payloads;
        }
    }

    /// <summary>A whole message's table of payload lengths (i64 each), and where its payloads' bytes start.</summary>
    private ReadOnlySpan<byte> WholePayloadLengths(out int payloads)
    {
        ReadOnlySpan<byte> head = First.Span;
        int position = 4 + (int)BinaryPrimitives.ReadUInt32LittleEndian(head);
        int count = BinaryPrimitives.ReadUInt16LittleEndian(head[position..]);
        position += 2;
        payloads = position + (8 * count);
        return head[position..payloads];
    }

    ReadOnlySpan<byte> IReplySource.Body => WholeBody.Span;

    ReadOnlyMemory<byte> IReplySource.BodyMemory => WholeBody;

    int IReplySource.PayloadCount => 0;

    SharedBuffer IReplySource.TakePayload(int index) => throw new ProtocolViolationException($"The reply names payload {index} but carries none.");

    void IReplySource.ThrowIfReplyGone(short version) => ObjectDisposedException.ThrowIf(IsReleased, typeof(RpcReply));

    void IReplySource.DisposeReply(short version) => Release();

    /// <summary>A frame does not know its connection: whoever made it a reply ends that when the reply does not decode.</summary>
    void IReplySource.AbortConnection(ProtocolViolationException violation)
    {
    }

    /// <summary>A credit frame: the client may send <paramref name="items"/> more items of its streamed argument.</summary>
    public static Frame Credit(int items)
    {
        byte[] count = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(count, items);
        return new Frame(FrameKind.Credit, count);
    }

    /// <summary>The items of a credit frame (its buffer goes back).</summary>
    /// <exception cref="ProtocolViolationException">The frame is not 4 bytes or grants nothing.</exception>
    public static int ReadCredit(Frame frame)
    {
        try
        {
            int items = frame.First.Length == 4 ? BinaryPrimitives.ReadInt32LittleEndian(frame.First.Span) : 0;
            return items > 0 ? items : throw new ProtocolViolationException($"A credit frame of {frame.First.Length} bytes granting {items} items.");
        }
        finally
        {
            frame.Release();
        }
    }

    /// <summary>A fault frame: the client's enumerable threw <paramref name="exception"/>.</summary>
    public static Frame Fault(Exception exception)
    {
        byte[] buffer = new byte[FaultCodec.MaxEncodedLength];
        int length = FaultCodec.Encode(exception, buffer, 0, full: true);
        return new Frame(FrameKind.Fault, buffer.AsMemory(0, length));
    }

    /// <summary>
    /// Serializes into gRPC's own buffer (no intermediate array), deserializes into a pooled buffer: the
    /// bytes are copied once each way besides the copy into or out of the caller's memory.
    /// </summary>
    public static readonly Marshaller<Frame> Marshaller = new(Serialize, Deserialize);

    /// <summary>
    /// <see cref="Marshaller"/> for the one request message of a served call, which gRPC deserializes before
    /// the method runs: a frame that does not deserialize ends the call with status Internal and the
    /// violation trailer, as a malformed request read by the route does, not as an unknown error.
    /// </summary>
    public static readonly Marshaller<Frame> OneRequestMarshaller = new(Serialize, DeserializeRequest);

    private static Frame DeserializeRequest(DeserializationContext context)
    {
        try
        {
            return Deserialize(context);
        }
        catch (ProtocolViolationException violation)
        {
            throw GrpcWire.Violation(violation);
        }
    }

    private static void Serialize(Frame frame, SerializationContext context)
    {
        if (!frame._owning)
        {
            Write(frame, context); // its memory is its sender's, who waits for the write
            return;
        }

        if (Interlocked.CompareExchange(ref frame._state, Writing, Idle) != Idle)
        {
            throw new ObjectDisposedException(nameof(Frame), "The call ended and gave the frame's buffer back before gRPC wrote it.");
        }

        try
        {
            Write(frame, context);
        }
        finally
        {
            if (Interlocked.CompareExchange(ref frame._state, Idle, Writing) == Released || frame._releaseAfterWrite)
            {
                frame.Release();
            }
        }
    }

    private static void Write(Frame frame, SerializationContext context)
    {
        int length = frame.Length;
        context.SetPayloadLength(length);
        IBufferWriter<byte> writer = context.GetBufferWriter();
        if (length <= SmallFrameBytes)
        {
            // A small frame (most heads) in one span of gRPC's buffer: one request of the writer, not one per part.
            Span<byte> span = writer.GetSpan(length);
            span[0] = (byte)frame.Kind;
            ReadOnlySpan<byte> first = frame.First.Span;
            first.CopyTo(span[1..]);
            frame.Second.Span.CopyTo(span[(1 + first.Length)..]);
            writer.Advance(length);
        }
        else
        {
            Span<byte> kind = writer.GetSpan(1);
            kind[0] = (byte)frame.Kind;
            writer.Advance(1);
            Write(writer, frame.First.Span);
            Write(writer, frame.Second.Span);
        }

        context.Complete();
    }

    /// <summary>Frames up to this size are written into one span of gRPC's buffer.</summary>
    private const int SmallFrameBytes = 4096;

    private static void Write(IBufferWriter<byte> writer, ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty)
        {
            Span<byte> span = writer.GetSpan(Math.Min(bytes.Length, 64 << 10));
            int n = Math.Min(span.Length, bytes.Length);
            bytes[..n].CopyTo(span);
            writer.Advance(n);
            bytes = bytes[n..];
        }
    }

    private static Frame Deserialize(DeserializationContext context)
    {
        ReadOnlySequence<byte> sequence = context.PayloadAsReadOnlySequence();
        if (sequence.Length < 1 || sequence.Length > MaxFrameBytes)
        {
            throw new ProtocolViolationException($"A gRPC frame of {sequence.Length} bytes (at most {MaxFrameBytes}).");
        }

        if (MessageAssembler.Receiving is { } receiver && sequence.FirstSpan[0] == (byte)FrameKind.Data && receiver.TryFill(sequence.Slice(1)))
        {
            return new Frame(FrameKind.Data, default); // its bytes are in the receiver's payload already
        }

        int length = (int)sequence.Length;
        byte[] rented = ArrayPool<byte>.Shared.Rent(length);
        sequence.CopyTo(rented);
        byte kind = rented[0];
        if (kind > (byte)FrameKind.Fault)
        {
            ArrayPool<byte>.Shared.Return(rented);
            throw new ProtocolViolationException($"A gRPC frame of unknown kind {kind}.");
        }

        return new Frame((FrameKind)kind, rented.AsMemory(1, length - 1), default, rented);
    }
}

/// <summary>
/// A request, reply or stream item on its way out: its body and payloads copied (or, for leases,
/// taken over) when it is made, so the builder it came from is free at once, except a request's
/// borrowed buffers (the caller's own, not transient), read as the frames go out; then written as frames.
/// </summary>
internal sealed class OutgoingMessage : IDisposable
{
    private readonly byte[] _head;
    private readonly int _headLength;
    private readonly Source[] _payloads;
    private readonly bool _inline;

    private readonly record struct Source(ReadOnlyMemory<byte> Data, SharedBuffer? Lease, byte[]? Rented);

    private OutgoingMessage(byte[] head, int headLength, Source[] payloads, bool inline)
    {
        _head = head;
        _headLength = headLength;
        _payloads = payloads;
        _inline = inline;
    }

    public static readonly OutgoingMessage EmptyReply = Create(default, default);

    /// <summary>True when the whole message is its head frame.</summary>
    public bool IsSingleFrame => _inline || _payloads.Length == 0;

    /// <summary>
    /// Copies the body and the payloads' bytes; leases are taken over (disposed with the message, or at once
    /// when it cannot be made). With
    /// <paramref name="borrow"/>, a payload in the caller's own memory (not a pooled, transient one) is
    /// not copied but read while the frames go out: only for a request whose caller awaits the reply,
    /// which is not given before the frames are written.
    /// </summary>
    public static OutgoingMessage Create(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, bool borrow = false)
    {
        bool inline = IsInline(payloads);
        byte[] head = RentHead(body, payloads, inline, out int headLength);
        Source[] sources = inline || payloads.Length == 0 ? [] : new Source[payloads.Length];
        try
        {
            for (int i = 0; i < sources.Length; i++)
            {
                OutboundPayload payload = payloads[i];
                if (payload.Lease is { } lease)
                {
                    sources[i] = new Source(default, lease, null); // read while the frames go out
                }
                else if (borrow && !payload.IsTransient)
                {
                    sources[i] = new Source(payload.Data, null, null); // the caller's buffer, valid until its call completes
                }
                else
                {
                    byte[] copy = ArrayPool<byte>.Shared.Rent(payload.Data.Length);
                    payload.Data.Span.CopyTo(copy);
                    sources[i] = new Source(copy.AsMemory(0, payload.Data.Length), null, copy);
                }
            }
        }
        catch
        {
            ArrayPool<byte>.Shared.Return(head);
            foreach (Source source in sources)
            {
                if (source.Rented is { } rented)
                {
                    ArrayPool<byte>.Shared.Return(rented);
                }
            }

            DisposeLeases(payloads); // the message took them over: they go back, not leak
            throw;
        }

        return new OutgoingMessage(head, headLength, sources, inline);
    }

    /// <summary>True when payloads this large ride in the head frame (the message is one frame).</summary>
    public static bool IsInline(ReadOnlySpan<OutboundPayload> payloads)
    {
        long total = 0;
        foreach (OutboundPayload payload in payloads)
        {
            total += payload.Length;
        }

        return total <= Frame.InlineBytes;
    }

    /// <summary>
    /// A message of one frame (<see cref="IsInline"/> payloads) as that frame, owning its pooled buffer, with
    /// no message around it: what <see cref="Create"/> then <see cref="DetachHead"/> give, for the common
    /// small call. Leases are copied in and disposed.
    /// </summary>
    public static Frame HeadFrame(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, bool releaseAfterWrite)
    {
        byte[] head = RentHead(body, payloads, inline: true, out int headLength);
        return Frame.Owning(FrameKind.Head, head, headLength, releaseAfterWrite);
    }

    /// <summary>
    /// The head in a pooled buffer: [u32 body length][body][u16 payload count][i64 length per payload], then
    /// with <paramref name="inline"/> the payloads' bytes (their leases disposed once copied).
    /// </summary>
    private static byte[] RentHead(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, bool inline, out int headLength)
    {
        if (payloads.Length > Frame.MaxPayloads)
        {
            DisposeLeases(payloads);
            throw new ArgumentException($"A message carries at most {Frame.MaxPayloads} buffers.");
        }

        long inlineBytes = 0;
        if (inline)
        {
            foreach (OutboundPayload payload in payloads)
            {
                inlineBytes += payload.Length;
            }
        }

        headLength = 4 + body.Length + 2 + (8 * payloads.Length) + (int)inlineBytes;
        byte[] head = ArrayPool<byte>.Shared.Rent(headLength);
        BinaryPrimitives.WriteUInt32LittleEndian(head, (uint)body.Length);
        body.CopyTo(head.AsSpan(4));
        int position = 4 + body.Length;
        BinaryPrimitives.WriteUInt16LittleEndian(head.AsSpan(position), (ushort)payloads.Length);
        position += 2;
        foreach (OutboundPayload payload in payloads)
        {
            BinaryPrimitives.WriteInt64LittleEndian(head.AsSpan(position), payload.Length);
            position += 8;
        }

        if (inline)
        {
            try
            {
                foreach (OutboundPayload payload in payloads)
                {
                    ReadOnlySpan<byte> bytes = payload.Lease is { } lease ? lease.Span : payload.Data.Span;
                    bytes.CopyTo(head.AsSpan(position));
                    position += bytes.Length;
                    payload.Lease?.Dispose(); // its bytes are in the head: the lease goes back now
                }
            }
            catch
            {
                ArrayPool<byte>.Shared.Return(head); // a lease the caller disposed already, say
                DisposeLeases(payloads); // the ones after it too: the message took them over
                throw;
            }
        }

        return head;
    }

    /// <summary>Every lease among <paramref name="payloads"/> goes back (disposing one twice is harmless).</summary>
    private static void DisposeLeases(ReadOnlySpan<OutboundPayload> payloads)
    {
        foreach (OutboundPayload payload in payloads)
        {
            payload.Lease?.Dispose();
        }
    }

    /// <summary>The message as frames: the head, then each payload in chunks.</summary>
    public IEnumerable<Frame> Frames(FrameKind head = FrameKind.Head)
    {
        yield return new Frame(head, _head.AsMemory(0, _headLength));
        foreach (Source source in _payloads)
        {
            ReadOnlyMemory<byte> bytes = source.Lease is { } lease ? lease.Memory : source.Data;
            for (int offset = 0; offset < bytes.Length; offset += Frame.ChunkBytes)
            {
                yield return new Frame(FrameKind.Data, bytes.Slice(offset, Math.Min(Frame.ChunkBytes, bytes.Length - offset)));
            }
        }
    }

    public Frame Head => new(FrameKind.Head, _head.AsMemory(0, _headLength));

    private bool _headDetached;

    /// <summary>
    /// The head frame of a one-frame message, owning the head's pooled buffer from now on (the message
    /// no longer gives it back): for a message gRPC writes on its own schedule, a unary call's request
    /// or reply (see <see cref="Frame.Owning"/>).
    /// </summary>
    public Frame DetachHead(bool releaseAfterWrite)
    {
        if (ReferenceEquals(this, EmptyReply))
        {
            return Head; // shared and never given back
        }

        if (_headDetached || !IsSingleFrame)
        {
            throw new InvalidOperationException(_headDetached ? "The head was detached already." : "A message of several frames is not sent as its head alone.");
        }

        _headDetached = true;
        return Frame.Owning(FrameKind.Head, _head, _headLength, releaseAfterWrite);
    }

    public void Dispose()
    {
        if (ReferenceEquals(this, EmptyReply))
        {
            return;
        }

        if (!_headDetached)
        {
            ArrayPool<byte>.Shared.Return(_head);
        }

        foreach (Source source in _payloads)
        {
            source.Lease?.Dispose();
            if (source.Rented is { } rented)
            {
                ArrayPool<byte>.Shared.Return(rented);
            }
        }
    }
}

/// <summary>
/// Puts a message back together from its frames: the body, and each payload in a lease of ordinary
/// (process-local) memory. Every length is checked against the limits before anything is allocated.
/// Once whole, a reply or stream item is read through it as the call's <see cref="IReplySource"/>
/// (<see cref="ToReply"/>): the message is its own reply, no second object per call.
/// </summary>
internal sealed class MessageAssembler : IDisposable, IReplySource
{
    private readonly int _maxBodyBytes;
    private readonly LeaseBudget? _budget;
    private Frame? _head;
    private SharedBuffer?[] _payloads = [];

    /// <summary>The payloads' lengths as the head announced them; each lease is made when its first byte arrives (<see cref="Lease"/>), so a head that names buffers costs nothing until their bytes come.</summary>
    private long[] _lengths = [];

    /// <summary>What each payload's lease counts against the budget, grown as its bytes arrive (<see cref="Cover"/>); null without a budget, or for an array.</summary>
    private ArrivalCharge?[] _charges = [];
    private int _current;
    private long _filled;

    /// <summary>Makes the array the message's one payload goes into, when the receiver's result or argument is that array (<see cref="ReceiveArray"/>).</summary>
    private ArrayReceiver? _arrayReceiver;

    /// <summary>Payload 0's array, while its bytes arrive and until it is taken (<see cref="TryTakeArray{T}"/>).</summary>
    private ReceivedArray? _array;

    /// <param name="budget">What the payloads' leases count against (a server's requests: <see cref="OffloadRpcOptions.MaxBufferedRequestBytes"/>); null: only the process's mapping cap.</param>
    public MessageAssembler(int maxBodyBytes, LeaseBudget? budget = null)
    {
        _maxBodyBytes = maxBodyBytes;
        _budget = budget;
    }

    private static readonly AsyncLocal<MessageAssembler?> s_receiving = new();

    /// <summary>
    /// The message whose payload bytes the frames read in this flow belong to, set by <see cref="ReceiveInPlace"/>:
    /// the deserializer then copies a data frame's bytes from gRPC's buffers into the payload's lease
    /// directly, instead of into a pooled array that <see cref="Accept"/> copies again.
    /// </summary>
    internal static MessageAssembler? Receiving => s_receiving.Value;

    private static long s_filledInPlace;

    /// <summary>Data frames this process filled into their leases as they were deserialized (a test hook).</summary>
    internal static long FramesFilledInPlace => Interlocked.Read(ref s_filledInPlace);

    /// <summary>
    /// From here to the end of the calling async method (whose flow the value does not outlive), data frames
    /// read are filled into this message's payloads as they are deserialized. Call it once the head is in
    /// and the message is not complete: a one-frame message pays nothing.
    /// </summary>
    public void ReceiveInPlace()
    {
        if (_head is not null && !IsComplete && !ReferenceEquals(s_receiving.Value, this))
        {
            s_receiving.Value = this;
        }
    }

    /// <summary>
    /// The message's one payload goes straight into the array <paramref name="receiver"/> makes (a reply whose
    /// result is that array: <see cref="Internal.MethodDescriptor.ResultArray"/>; a request whose one buffer
    /// argument is: <see cref="Internal.MethodDescriptor.ArgumentArray"/>), counted against the budget
    /// like a lease, and the decoder takes it as it is: one copy of its bytes, not two. Set before the head
    /// arrives; a message of any other shape keeps its leases.
    /// </summary>
    /// <param name="maxBytes">The largest payload received into an array; a larger one keeps its lease (<see cref="MaxArrayArgumentBytes"/> on a server).</param>
    public void ReceiveArray(ArrayReceiver? receiver, long maxBytes = long.MaxValue)
    {
        if (_head is null)
        {
            _arrayReceiver = receiver;
            _arrayMaxBytes = maxBytes;
        }
    }

    private long _arrayMaxBytes = long.MaxValue;

    /// <summary>
    /// The largest array argument a server receives into its array: one step of the budget
    /// (<see cref="ArrivalCharge.Step"/>). The array is garbage-collected heap, made whole at the payload's
    /// first byte and counted whole from there, where a lease's pages cost nothing until their bytes come and
    /// count as they do: a client that names a large array and sends one byte would make the server commit
    /// heap it never fills (under a container's heap limit, room other allocations then lack), and hold that
    /// much of the budget other callers need, with each call. So no argument holds more than a step before
    /// its bytes come; a larger one keeps its lease and its second copy.
    /// </summary>
    public const long MaxArrayArgumentBytes = ArrivalCharge.Step;

    /// <summary>
    /// Fills <paramref name="bytes"/> (a data frame's, from gRPC's buffers) into the payloads when they all
    /// fit what the head announced; false leaves them to the ordinary path (and <see cref="Accept"/> to
    /// refuse them as it would).
    /// </summary>
    public bool TryFill(ReadOnlySequence<byte> bytes)
    {
        if (_head is null || IsComplete || bytes.Length > RemainingPayloadBytes || !TryLeaseAhead(bytes.Length))
        {
            return false;
        }

        foreach (ReadOnlyMemory<byte> segment in bytes)
        {
            Fill(segment.Span);
        }

        Interlocked.Increment(ref s_filledInPlace);
        return true;
    }

    /// <summary>
    /// Makes the leases the next <paramref name="bytes"/> go into and counts those bytes against the budget,
    /// so that filling them in gRPC's deserializer cannot fail halfway; false when this process has no room
    /// (<see cref="Accept"/> then meets the failure on the ordinary path, where the call ends with it).
    /// </summary>
    private bool TryLeaseAhead(long bytes)
    {
        try
        {
            for (int i = _current; i < _lengths.Length && bytes > 0; i++)
            {
                Prepare(i);
                long start = i == _current ? _filled : 0;
                long take = Math.Min(bytes, _lengths[i] - start);
                Cover(i, start + take);
                bytes -= take;
            }

            return true;
        }
        catch (ArenaExhaustedException)
        {
            return false;
        }
    }

    private long RemainingPayloadBytes
    {
        get
        {
            long remaining = -_filled;
            for (int i = _current; i < _payloads.Length; i++)
            {
                remaining += _lengths[i];
            }

            return remaining;
        }
    }

    public bool IsComplete { get; private set; }

    /// <summary>The kind of the message's head: a reply or request (<see cref="FrameKind.Head"/>) or a stream item.</summary>
    public FrameKind HeadKind => _head?.Kind ?? FrameKind.Head;

    public ReadOnlyMemory<byte> Body { get; private set; }

    public int PayloadCount => _payloads.Length;

    /// <summary>Takes frame <paramref name="frame"/> (and its buffer); true once the message is whole.</summary>
    public bool Accept(Frame frame)
    {
        if (IsComplete)
        {
            frame.Release();
            throw new ProtocolViolationException("A frame after the end of a message.");
        }

        if (_head is null)
        {
            if (frame.Kind == FrameKind.Data)
            {
                frame.Release();
                throw new ProtocolViolationException("A message that does not start with its head.");
            }

            _head = frame;
            if (_budget is { CountsHeads: true })
            {
                frame.ChargeTo(_budget); // a large request head is memory the peer holds here as much as its buffers
            }

            ReadOnlySpan<byte> head = frame.First.Span;
            if (head.Length < 6)
            {
                throw new ProtocolViolationException($"A message head of {head.Length} bytes.");
            }

            uint bodyLength = BinaryPrimitives.ReadUInt32LittleEndian(head);
            if (bodyLength > (uint)_maxBodyBytes || bodyLength > head.Length - 6)
            {
                throw new ProtocolViolationException($"A message body of {bodyLength} bytes in a head of {head.Length} (at most {_maxBodyBytes}).");
            }

            Body = frame.First.Slice(4, (int)bodyLength);
            int position = 4 + (int)bodyLength;
            int count = BinaryPrimitives.ReadUInt16LittleEndian(head[position..]);
            position += 2;
            if (count > Frame.MaxPayloads)
            {
                throw new ProtocolViolationException($"A message head names {count} payloads (at most {Frame.MaxPayloads}).");
            }

            if (head.Length - position < 8L * count)
            {
                throw new ProtocolViolationException($"A message head names {count} payloads but is {head.Length} bytes.");
            }

            _payloads = count == 0 ? [] : new SharedBuffer?[count];
            _lengths = count == 0 ? [] : new long[count];
            _charges = count == 0 || _budget is null ? [] : new ArrivalCharge?[count];
            for (int i = 0; i < count; i++)
            {
                long length = BinaryPrimitives.ReadInt64LittleEndian(head[position..]);
                position += 8;
                if (length < 0 || length > TransportProtocol.MaxPayloadLength)
                {
                    throw new ProtocolViolationException($"A payload of {length} bytes (at most {TransportProtocol.MaxPayloadLength}).");
                }

                _lengths[i] = length;
                PayloadBytes += length;
            }

            if (count != 1 || frame.Kind != FrameKind.Head || _lengths[0] > _arrayMaxBytes)
            {
                _arrayReceiver = null; // only a reply's or a request's one buffer is its array (a stream item keeps its lease)
            }

            Fill(frame.First.Span[position..]);
        }
        else
        {
            try
            {
                if (frame.Kind != FrameKind.Data)
                {
                    throw new ProtocolViolationException("A message head before the previous message ended.");
                }

                Fill(frame.First.Span);
            }
            finally
            {
                frame.Release();
            }
        }

        SkipFull();
        IsComplete = _current == _payloads.Length;
        return IsComplete;
    }

    private void Fill(ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty)
        {
            SkipFull();
            if (_current == _payloads.Length)
            {
                throw new ProtocolViolationException("More payload bytes than the message head announced.");
            }

            Span<byte> destination = Destination(_current);
            int n = (int)Math.Min(bytes.Length, _lengths[_current] - _filled);
            Cover(_current, _filled + n);
            bytes[..n].CopyTo(destination[(int)_filled..]);
            _filled += n;
            bytes = bytes[n..];
        }
    }

    private void SkipFull()
    {
        while (_current < _payloads.Length && _filled == _lengths[_current])
        {
            Prepare(_current); // an empty payload's lease (or array), made when the bytes before it are in
            Cover(_current, _filled); // all of it in: its whole mapping counts
            _current++;
            _filled = 0;
        }
    }

    /// <summary>
    /// Payload <paramref name="index"/>'s lease, made now if its bytes start arriving (every byte is filled
    /// before the message is whole), with nothing counted yet: its bytes count as they come (<see cref="Cover"/>).
    /// </summary>
    private SharedBuffer Lease(int index)
    {
        if (_payloads[index] is { } made)
        {
            return made;
        }

        if (_budget is null)
        {
            return _payloads[index] = LocalLeases.Instance.Rent((int)_lengths[index], clear: false);
        }

        SharedBuffer lease = _budget.RentArriving((int)_lengths[index], out ArrivalCharge charge);
        _charges[index] = charge;
        return _payloads[index] = lease;
    }

    /// <summary>
    /// Counts payload <paramref name="index"/>'s bytes up to <paramref name="end"/> against the budget, before
    /// they are copied in (an array counted whole when made, and no budget, count nothing here); no room
    /// throws <see cref="ArenaExhaustedException"/>. So a head that names a large buffer and sends a byte
    /// holds a step of the budget, not the buffer's size.
    /// </summary>
    private void Cover(int index, long end)
    {
        if (index < _charges.Length && _charges[index] is { } charge)
        {
            charge.Cover(end);
        }
    }

    /// <summary>Makes payload <paramref name="index"/>'s array (<see cref="ReceiveArray"/>) or lease, if not made yet, as its bytes start arriving.</summary>
    private void Prepare(int index)
    {
        if (index == 0 && _arrayReceiver is { } receiver)
        {
            _array = MakeArray(receiver, _lengths[0]);
            _arrayReceiver = null; // made once: from here the array is there, or a lease is
        }

        if (index != 0 || _array is null)
        {
            _ = Lease(index);
        }
    }

    /// <summary>
    /// The array of <paramref name="bytes"/> bytes, counted against the budget; null when they are not a whole
    /// number of elements (a lease then, which the decoder refuses). The array is ordinary managed memory,
    /// made at the payload's first byte: a length the GC cannot give (past a container's heap limit, say) is
    /// no room, as a lease past the mapping cap is.
    /// </summary>
    private ReceivedArray? MakeArray(ArrayReceiver receiver, long bytes)
    {
        _budget?.Reserve(bytes, "a buffer");
        ReceivedArray? array;
        try
        {
            array = receiver.TryCreate(bytes);
        }
        catch (OutOfMemoryException)
        {
            _budget?.Release(bytes);
            throw new ArenaExhaustedException($"This process has no room for a buffer of {bytes:N0} bytes (the array of a call's result or argument).");
        }

        if (array is null)
        {
            _budget?.Release(bytes);
        }

        return array;
    }

    /// <summary>Where payload <paramref name="index"/>'s bytes go: its array or its lease (made now if need be).</summary>
    private Span<byte> Destination(int index)
    {
        Prepare(index);
        return index == 0 && _array is { } array ? array.Bytes : Lease(index).Span;
    }

    /// <summary>Payload <paramref name="index"/>, now the caller's; null when taken already. One received into an array is copied into a lease (a decoder that did not ask for the array).</summary>
    public SharedBuffer? Take(int index)
    {
        if (index == 0 && TakeArray() is { } array)
        {
            SharedBuffer copy = LeaseBudget.Rent(_budget, (int)array.ByteLength);
            array.Bytes.CopyTo(copy.Span);
            return copy;
        }

        SharedBuffer? lease = _payloads[index];
        _payloads[index] = null;
        return lease;
    }

    /// <summary>Payload 0's array, now the caller's (its bytes leave the budget: ordinary memory from here); null when there is none.</summary>
    private ReceivedArray? TakeArray()
    {
        ReceivedArray? array = _array;
        if (array is not null)
        {
            _array = null;
            _budget?.Release(array.ByteLength);
        }

        return array;
    }

    /// <summary>Payload <paramref name="index"/> as the array of <typeparamref name="T"/> it was received into; false when it was not (or was taken).</summary>
    public bool TryTakeArray<T>(int index, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out T[]? array)
        where T : unmanaged
    {
        if (index == 0 && _array is ReceivedArray<T> received)
        {
            TakeArray();
            array = received.Array;
            return true;
        }

        array = null;
        return false;
    }

    public bool IsTaken(int index) => _payloads[index] is null && (index != 0 || _array is null);

    /// <summary>The bytes of every payload together, as the head announced them (taken or not: over shared memory the same figure).</summary>
    public long PayloadBytes { get; private set; }

    private IGrpcPeer? _peer;
    private List<SharedBuffer>? _lent;
    private int _disposed;

    /// <summary>The whole message as a reply from <paramref name="peer"/> (told when it does not decode); disposing the reply disposes this.</summary>
    public RpcReply ToReply(IGrpcPeer peer)
    {
        _peer = peer;
        return new RpcReply(this, 0);
    }

    ReadOnlySpan<byte> IReplySource.Body => Body.Span;

    ReadOnlyMemory<byte> IReplySource.BodyMemory => Body;

    SharedBuffer IReplySource.TakePayload(int index) =>
        Take(index) ?? throw new ProtocolViolationException($"The reply names payload {index} twice.");

    bool IReplySource.TryTakeArray<T>(int index, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out T[]? array) => TryTakeArray(index, out array);

    SharedBuffer IReplySource.LendPayload(int index)
    {
        SharedBuffer lease = Take(index) ?? throw new ProtocolViolationException($"The reply names payload {index} twice.");
        (_lent ??= []).Add(lease); // lent until the reply is disposed
        return lease;
    }

    void IReplySource.ThrowIfReplyGone(short version) => ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, typeof(RpcReply));

    void IReplySource.DisposeReply(short version) => Dispose();

    void IReplySource.AbortConnection(ProtocolViolationException violation) => _peer?.AbortConnection(violation);

    /// <summary>The head's buffer, every payload not taken and every one lent go back (once: as a message or as the reply it became).</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        if (_lent is not null)
        {
            foreach (SharedBuffer lease in _lent)
            {
                lease.Dispose();
            }
        }

        _head?.Release();
        _head = null;
        Body = default;
        TakeArray(); // back to the budget, left to the collector
        for (int i = 0; i < _payloads.Length; i++)
        {
            _payloads[i]?.Dispose();
            _payloads[i] = null;
        }
    }
}
