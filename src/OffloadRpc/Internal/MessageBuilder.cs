using System.Buffers;
using System.ComponentModel;
using System.Runtime.InteropServices;
using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>
/// The body (MessagePack) and buffers of one outgoing request or response, built by generated code.
/// One per thread, reused: a builder is rented, filled, and handed to the transport, which copies
/// everything into shared memory before it returns, so the builder is free again at once.
/// </summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public sealed class MessageBuilder
{
    [ThreadStatic]
    private static MessageBuilder? t_cached;

    private readonly ArrayBufferWriter<byte> _body = new(256);
    private readonly List<OutboundPayload> _payloads = new(4);
    private readonly List<MemoryHandle> _pins = new(4);
    private readonly List<byte[]> _rented = new(1);
    private List<DeferredPayload>? _deferred;
    private ItemStream? _items;
    private ArrayBufferWriter<byte>? _framed;

    private MessageBuilder()
    {
    }

    /// <summary>Where the generated code writes the MessagePack body.</summary>
    public IBufferWriter<byte> Body => _body;

    /// <summary>Takes this thread's builder (or a new one when it is in use).</summary>
    public static MessageBuilder Rent()
    {
        MessageBuilder? builder = t_cached;
        if (builder is null)
        {
            return new MessageBuilder();
        }

        t_cached = null;
        return builder;
    }

    /// <summary>Adds a buffer to copy into shared memory; returns its payload index.</summary>
    public int AddBuffer<T>(ReadOnlyMemory<T> buffer)
        where T : unmanaged => AddBuffer(buffer, TransferMode.Auto, CachePolicy.Auto);

    /// <summary>Adds a buffer to copy into shared memory in the given mode; returns its payload index.</summary>
    public int AddBuffer<T>(ReadOnlyMemory<T> buffer, TransferMode mode, CachePolicy cache)
        where T : unmanaged
    {
        if (typeof(T) == typeof(byte))
        {
            ReadOnlyMemory<byte> bytes = System.Runtime.CompilerServices.Unsafe.As<ReadOnlyMemory<T>, ReadOnlyMemory<byte>>(ref buffer);
            _payloads.Add(OutboundPayload.Copy(bytes, mode, cache));
        }
        else
        {
            // Reinterpreting Memory<T> as bytes needs a view over a pin that ends when the call's send returns: so it is
            // transient (copied before then, never read later, e.g. by the gRPC transport's frame writer).
            MemoryHandle pin = buffer.Pin();
            _pins.Add(pin);
            unsafe
            {
                _payloads.Add(OutboundPayload.CopyTransient(new UnmanagedMemoryView((byte*)pin.Pointer, checked(buffer.Length * System.Runtime.CompilerServices.Unsafe.SizeOf<T>())).Memory, mode, cache));
            }
        }

        return _payloads.Count - 1;
    }

    /// <summary>Adds an array (null gives -1: no payload).</summary>
    public int AddArray<T>(T[]? array)
        where T : unmanaged => array is null ? -1 : AddBuffer<T>(array);

    /// <summary>Adds an array in the given mode (null gives -1: no payload).</summary>
    public int AddArray<T>(T[]? array, TransferMode mode, CachePolicy cache)
        where T : unmanaged => array is null ? -1 : AddBuffer<T>(array, mode, cache);

    /// <summary>
    /// Adds the rest of <paramref name="stream"/> (null gives -1). Over shared memory (Pipelined or Auto) it is
    /// read through a ring as the server reads it out (a seekable stream announces its length, one that cannot
    /// seek marks its end when it ends); otherwise it is read whole, asynchronously, before the request is sent.
    /// </summary>
    public int AddStream(Stream? stream, TransferMode mode = TransferMode.Auto, CachePolicy cache = CachePolicy.Auto) =>
        stream is null ? -1 : AddDeferred(new DeferredPayload(_payloads.Count, stream, null, mode, cache));

    /// <summary>
    /// Adds the chunks of <paramref name="chunks"/> as one pipelined payload (null gives -1). They are
    /// enumerated asynchronously before the request is sent; Auto means Pipelined here.
    /// </summary>
    public int AddChunks(IAsyncEnumerable<ReadOnlyMemory<byte>>? chunks, TransferMode mode = TransferMode.Auto, CachePolicy cache = CachePolicy.Auto) =>
        chunks is null ? -1 : AddDeferred(new DeferredPayload(_payloads.Count, null, chunks, mode, cache));

    private int AddDeferred(DeferredPayload deferred)
    {
        _payloads.Add(default); // filled in by GatherAsync
        (_deferred ??= new List<DeferredPayload>(1)).Add(deferred);
        return deferred.Index;
    }

    /// <summary>Stream or async-enumerable arguments still to be read (<see cref="GatherAsync"/>) before the request can be sent.</summary>
    internal bool HasDeferredPayloads => _deferred is { Count: > 0 };

    /// <summary>
    /// Reads every deferred argument into a pooled buffer, without blocking a thread. With
    /// <paramref name="pipelineStreams"/>, a <see cref="Stream"/> argument sent Pipelined (or Auto) is not
    /// read here: it becomes a <see cref="StreamSource"/>, read straight into a ring in shared memory after
    /// the request is out, and returned so that the caller can await its last byte.
    /// </summary>
    internal async ValueTask<StreamSource[]?> GatherAsync(CancellationToken cancellationToken, bool pipelineStreams = false)
    {
        if (_deferred is null)
        {
            return null;
        }

        List<StreamSource>? sources = null;
        foreach (DeferredPayload deferred in _deferred)
        {
            if (pipelineStreams && deferred.Stream is { } piped && deferred.Mode is TransferMode.Auto or TransferMode.Pipelined)
            {
                // Through a ring of a few chunks, whatever its length (over 2 GiB too); a seekable stream
                // announces its length, one that cannot seek has none to announce and marks its end when it ends.
                long remaining = piped.CanSeek ? Math.Max(0, piped.Length - piped.Position) : -1;
                if (remaining != 0)
                {
                    var source = new StreamSource(piped, remaining, cancellationToken);
                    (sources ??= new List<StreamSource>(1)).Add(source);
                    _payloads[deferred.Index] = OutboundPayload.FromStream(source, deferred.Cache);
                    continue;
                }
            }

            (byte[] buffer, int length) = deferred.Stream is { } stream
                ? await ReadWholeAsync(stream, cancellationToken).ConfigureAwait(false)
                : await ConcatenateAsync(deferred.Chunks!, cancellationToken).ConfigureAwait(false);
            _rented.Add(buffer);
            TransferMode mode = deferred.Mode == TransferMode.Auto ? TransferMode.Pipelined : deferred.Mode;
            _payloads[deferred.Index] = OutboundPayload.CopyTransient(buffer.AsMemory(0, length), mode, deferred.Cache);
        }

        _deferred.Clear();
        return sources?.ToArray();
    }

    /// <summary>The most bytes a gathered argument holds: one payload, in one array.</summary>
    private static readonly int MaxGatheredBytes = (int)Math.Min(TransportProtocol.MaxPayloadLength, Array.MaxLength);

    private static async ValueTask<(byte[] Buffer, int Length)> ReadWholeAsync(Stream stream, CancellationToken cancellationToken)
    {
        long remaining = stream.CanSeek ? Math.Max(0, stream.Length - stream.Position) : 0;
        if (remaining > MaxGatheredBytes)
        {
            throw TooLarge(remaining);
        }

        byte[] buffer = ArrayPool<byte>.Shared.Rent((int)Math.Max(remaining, 4096));
        int length = 0;
        try
        {
            while (true)
            {
                if (length == buffer.Length)
                {
                    if (stream.CanSeek && stream.Position >= stream.Length)
                    {
                        break; // filled exactly (pooled sizes are powers of two): no larger buffer, no copy
                    }

                    Grow(ref buffer, length, length + 1);
                }

                int read = await stream.ReadAsync(buffer.AsMemory(length), cancellationToken).ConfigureAwait(false);
                if (read == 0)
                {
                    break;
                }

                length += read;
            }
        }
        catch
        {
            ArrayPool<byte>.Shared.Return(buffer);
            throw;
        }

        return (buffer, length);
    }

    private static async ValueTask<(byte[] Buffer, int Length)> ConcatenateAsync(IAsyncEnumerable<ReadOnlyMemory<byte>> chunks, CancellationToken cancellationToken)
    {
        byte[] buffer = ArrayPool<byte>.Shared.Rent(4096);
        int length = 0;
        try
        {
            await foreach (ReadOnlyMemory<byte> chunk in chunks.WithCancellation(cancellationToken).ConfigureAwait(false))
            {
                if (chunk.Length > buffer.Length - length)
                {
                    Grow(ref buffer, length, (long)length + chunk.Length);
                }

                chunk.Span.CopyTo(buffer.AsSpan(length));
                length += chunk.Length;
            }
        }
        catch
        {
            ArrayPool<byte>.Shared.Return(buffer);
            throw;
        }

        return (buffer, length);
    }

    private static ArgumentException TooLarge(long bytes) =>
        new($"A Stream or chunk-sequence argument of {bytes:N0} bytes or more: gathered into one buffer before the call is sent (over gRPC, or when it is not pipelined), it may be at most {MaxGatheredBytes:N0} bytes.");

    /// <summary>Moves the first <paramref name="length"/> bytes into a pooled buffer of at least <paramref name="needed"/> (doubling).</summary>
    private static void Grow(ref byte[] buffer, int length, long needed)
    {
        if (needed > MaxGatheredBytes)
        {
            throw TooLarge(needed);
        }

        byte[] larger = ArrayPool<byte>.Shared.Rent((int)Math.Min(Math.Max((long)buffer.Length * 2, needed), MaxGatheredBytes));
        buffer.AsSpan(0, length).CopyTo(larger);
        ArrayPool<byte>.Shared.Return(buffer);
        buffer = larger;
    }

    /// <summary>
    /// Adds a streamed argument (null gives -1): after the request is out, its items are sent one by one,
    /// each encoded by <paramref name="encode"/>, never more than the server's window ahead of what the
    /// server's method has taken. One per request.
    /// </summary>
    public int AddItems<T>(IAsyncEnumerable<T>? items, StreamItemEncoder<T> encode)
    {
        ArgumentNullException.ThrowIfNull(encode);
        if (items is null)
        {
            return -1;
        }

        if (_items is not null)
        {
            throw new InvalidOperationException("A request carries at most one streamed argument.");
        }

        _items = new ItemStream<T>(items, encode);
        return 0;
    }

    /// <summary>Whether the request has a streamed argument (not taken yet).</summary>
    internal bool HasItemStream => _items is not null;

    /// <summary>The streamed argument, taken by the transport that sends the request (null: none).</summary>
    internal ItemStream? TakeItemStream()
    {
        ItemStream? items = _items;
        _items = null;
        return items;
    }

    /// <summary>Adds a lease whose ownership moves with the message (null gives -1).</summary>
    public int AddSharedBuffer(SharedBuffer? lease)
    {
        if (lease is null)
        {
            return -1;
        }

        _payloads.Add(OutboundPayload.Move(lease));
        return _payloads.Count - 1;
    }

    /// <summary>
    /// Drops a builder whose message will not be sent (its encoding failed): leases added to it were
    /// handed over with the call, so they go back; then it is unpinned and cleared.
    /// </summary>
    public void Discard()
    {
        foreach (OutboundPayload payload in _payloads)
        {
            payload.Lease?.Dispose();
        }

        Return();
    }

    internal ReadOnlySpan<byte> WrittenBody => _body.WrittenSpan;

    /// <summary>
    /// The body behind a metadata block, [u32 length][block][arguments] (a request flagged HasMetadata): the
    /// block is encoded in place in a buffer this builder keeps, the arguments copied after it.
    /// </summary>
    internal ReadOnlySpan<byte> FrameWithMetadata(in OutgoingMetadata metadata)
    {
        ArrayBufferWriter<byte> framed = _framed ??= new ArrayBufferWriter<byte>(256);
        framed.ResetWrittenCount();
        framed.GetSpan(4);
        framed.Advance(4);
        metadata.Encode(framed);
        int blockLength = framed.WrittenCount - 4;
        framed.Write(_body.WrittenSpan);
        ReadOnlySpan<byte> frame = framed.WrittenSpan;
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(MemoryMarshal.CreateSpan(ref MemoryMarshal.GetReference(frame), 4), (uint)blockLength);
        return frame;
    }

    internal ReadOnlySpan<OutboundPayload> Payloads => CollectionsMarshal.AsSpan(_payloads);

    /// <summary>Clears the builder and gives it back to this thread.</summary>
    internal void Return()
    {
        foreach (MemoryHandle pin in _pins)
        {
            pin.Dispose();
        }

        _pins.Clear();
        foreach (byte[] buffer in _rented)
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }

        _rented.Clear();
        _payloads.Clear();
        _items = null;
        _deferred?.Clear();
        if (_framed is { Capacity: > 1 << 20 })
        {
            _framed = null;
        }

        if (_body.Capacity > 1 << 20)
        {
            t_cached = null; // let an unusually large body go
            return;
        }

        _body.ResetWrittenCount();
        t_cached = this;
    }

    private readonly record struct DeferredPayload(int Index, Stream? Stream, IAsyncEnumerable<ReadOnlyMemory<byte>>? Chunks, TransferMode Mode, CachePolicy Cache);

    /// <summary>A byte view of pinned memory, valid while the pin is held (until the transport has copied it).</summary>
    private sealed unsafe class UnmanagedMemoryView : MemoryManager<byte>
    {
        private readonly byte* _pointer;
        private readonly int _length;

        public UnmanagedMemoryView(byte* pointer, int length)
        {
            _pointer = pointer;
            _length = length;
        }

        public override Span<byte> GetSpan() => new(_pointer, _length);

        public override MemoryHandle Pin(int elementIndex = 0) => new(_pointer + elementIndex);

        public override void Unpin()
        {
        }

        protected override void Dispose(bool disposing)
        {
        }
    }
}
