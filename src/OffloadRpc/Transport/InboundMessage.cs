using System.Buffers;
using System.Diagnostics;

namespace OffloadRpc.Transport;

/// <summary>A payload reference of a received message, already validated and holding a mapping reference.</summary>
internal struct ReceivedPayload
{
    public SharedMemorySegment Segment;
    public long Offset;
    public int Length;

    /// <summary>The block is in this side's own arena (the peer sent a lease back).</summary>
    public bool OwnArena;

    /// <summary>Handed to user code as a lease; no longer ours to release.</summary>
    public bool Taken;

    /// <summary>Still being written by the sender: <see cref="BlockOffset"/> holds its progress header.</summary>
    public bool Pipelined;

    /// <summary>Pipelined through a ring (a Stream argument): <see cref="Length"/> is the ring's capacity; it can only be read as a stream.</summary>
    public bool Streamed;

    /// <summary>Streamed, with its length announced in the header (<see cref="PayloadRef.LengthAnnounced"/>).</summary>
    public bool Announced;

    /// <summary>Where the arena block starts (the release handle): <see cref="Offset"/>, or the header of a pipelined payload.</summary>
    public long BlockOffset;
}

/// <summary>
/// A received message's body (copied out of the ring slot) and payloads (still in shared memory).
/// Reused from a pool: the body buffer and the payload array survive across messages.
/// </summary>
internal abstract class InboundMessage
{
    private const int PooledBodyLimit = 64 * 1024;

    private byte[] _body;
    private int _bodyLength;
    private int _bodyStart;
    private int _metadataLength;
    private readonly ReceivedPayload[] _payloads = new ReceivedPayload[TransportProtocol.MaxPayloadsPerMessage];
    private int _payloadCount;

    protected InboundMessage(RpcConnection connection)
    {
        Connection = connection;
        _body = []; // grown on first use: a table of idle entries costs no body memory
    }

    public RpcConnection Connection { get; }

    public int MethodId { get; private set; }

    /// <summary>The body (after the metadata block, when the message has one).</summary>
    public ReadOnlySpan<byte> Body => _body.AsSpan(_bodyStart, _bodyLength - _bodyStart);

    /// <summary>The body as memory (for readers that keep it, like MessagePackReader); valid until the message is recycled.</summary>
    public ReadOnlyMemory<byte> BodyMemory => _body.AsMemory(_bodyStart, _bodyLength - _bodyStart);

    /// <summary>The request's metadata block (headers, deadline, trace context), empty when it has none; decoded by Internal.CallMetadata.</summary>
    public ReadOnlyMemory<byte> Metadata => _metadataLength == 0 ? default : _body.AsMemory(4, _metadataLength);

    /// <summary>Whether the request carried a metadata block.</summary>
    public bool HasMetadata => _bodyStart != 0;

    /// <summary>
    /// The body starts with a metadata block: a little-endian u32 length and the block. False when the
    /// length does not fit the body (the peer's protocol violation).
    /// </summary>
    internal bool SplitMetadata()
    {
        if (_bodyLength < 4)
        {
            return false;
        }

        uint length = System.Buffers.Binary.BinaryPrimitives.ReadUInt32LittleEndian(_body);
        if (length > (uint)(_bodyLength - 4))
        {
            return false;
        }

        _metadataLength = (int)length;
        _bodyStart = 4 + (int)length;
        return true;
    }

    public int PayloadCount => _payloadCount;

    /// <summary>The bytes of every payload together (the arguments' buffers).</summary>
    public long PayloadBytes
    {
        get
        {
            long total = 0;
            for (int i = 0; i < _payloadCount; i++)
            {
                total += _payloads[i].Length;
            }

            return total;
        }
    }

    /// <summary>True when payload <paramref name="index"/> was already taken.</summary>
    public bool IsPayloadTaken(int index)
    {
        ValidateIndex(index);
        return _payloads[index].Taken;
    }

    /// <summary>
    /// Takes payload <paramref name="index"/> as a lease; the caller disposes it. Once per payload. A
    /// pipelined payload is waited for until every byte has landed (use <see cref="OpenPayloadStream"/>
    /// to start on the first chunk instead).
    /// </summary>
    public SharedBuffer TakePayload(int index)
    {
        ValidateIndex(index);
        ref ReceivedPayload payload = ref _payloads[index];
        if (payload.Taken)
        {
            throw new InvalidOperationException($"Payload {index} was already taken.");
        }

        ThrowIfStreamed(payload, index);
        if (payload.Pipelined)
        {
            Progress(payload).WaitFor(payload.Length, CancellationToken.None);
        }

        payload.Taken = true;
        // The mapping reference taken when the message was received moves to the lease.
        Debug.Assert(payload.Segment.IsMapped, "a received payload holds a mapping reference until it is taken or released");
        return new SharedBuffer(Connection, payload.Segment, payload.Offset, payload.Length, payload.OwnArena, payload.BlockOffset);
    }

    /// <summary>Waits until the first <paramref name="bytes"/> of payload <paramref name="index"/> have landed (immediate for a payload that is not pipelined).</summary>
    public void WaitForPayloadBytes(int index, long bytes, CancellationToken cancellationToken = default)
    {
        ValidateIndex(index);
        ThrowIfStreamed(_payloads[index], index);
        if (_payloads[index].Pipelined && !_payloads[index].Taken)
        {
            Progress(_payloads[index]).WaitFor(bytes, cancellationToken);
        }
    }

    /// <summary>
    /// Takes payload <paramref name="index"/> as a read-only stream. For a pipelined payload a read
    /// returns as soon as bytes land, so the reader starts on the first chunk while the rest moves.
    /// Disposing the stream gives the block back.
    /// </summary>
    public unsafe Stream OpenPayloadStream(int index, CancellationToken cancellationToken = default)
    {
        ValidateIndex(index);
        ref ReceivedPayload payload = ref _payloads[index];
        if (payload.Taken)
        {
            throw new InvalidOperationException($"Payload {index} was already taken.");
        }

        if (!payload.Pipelined)
        {
            SharedBuffer lease = TakePayload(index);
            return new LeaseStream(lease);
        }

        payload.Taken = true;
        SharedMemorySegment segment = payload.Segment;
        long blockOffset = payload.BlockOffset;
        RpcConnection connection = Connection;
        return new PipelinedPayloadStream(Progress(payload), segment.Pointer(payload.Offset, payload.Length), segment, () => connection.ReleaseReceivedBlock(segment, blockOffset, ownArena: false), connection.PipelineChunkBytes, cancellationToken);
    }

    /// <summary>Test hook: the progress header of pipelined payload <paramref name="index"/> (a hostile peer forges its counters).</summary>
    internal unsafe PipelineHeader* PipelineHeaderForTests(int index)
    {
        ValidateIndex(index);
        ref ReceivedPayload payload = ref _payloads[index];
        return payload.Pipelined ? (PipelineHeader*)payload.Segment.Pointer(payload.BlockOffset, PipelineHeader.Size) : null;
    }

    private unsafe PipelinedPayload Progress(in ReceivedPayload payload) =>
        new(Connection, payload.Segment.Pointer(payload.BlockOffset, PipelineHeader.Size), payload.Length, payload.Streamed, payload.Announced);

    /// <summary>A streamed payload is a ring, never whole at once: only a Stream parameter can take it (a peer that sends one for a buffer breaks the contract).</summary>
    private void ThrowIfStreamed(in ReceivedPayload payload, int index)
    {
        if (payload.Streamed)
        {
            var violation = new ProtocolViolationException($"Protocol violation by peer process {Connection.Peer.ProcessId}: payload {index} is a stream (a ring) where a buffer was expected.");
            Connection.Terminate(violation);
            throw violation;
        }
    }

    private void ValidateIndex(int index)
    {
        if ((uint)index >= (uint)_payloadCount)
        {
            throw new ArgumentOutOfRangeException(nameof(index), $"The message has {_payloadCount} payloads.");
        }
    }

    /// <summary>Room for a body of <paramref name="length"/> bytes (the receiver fills it).</summary>
    internal Span<byte> PrepareBody(int methodId, int length)
    {
        MethodId = methodId;
        _bodyStart = 0;
        _metadataLength = 0;
        if (_body.Length < length)
        {
            ReturnLargeBody();
            _body = length <= PooledBodyLimit ? new byte[Math.Max(length, 256)] : ArrayPool<byte>.Shared.Rent(length);
        }

        _bodyLength = length;
        return _body.AsSpan(0, length);
    }

    internal void AddPayload(in ReceivedPayload payload)
    {
        _payloads[_payloadCount++] = payload;
        HasPipelinedPayload |= payload.Pipelined;
    }

    /// <summary>A payload of this message is still being written by the sender (taking it whole waits for the rest).</summary>
    public bool HasPipelinedPayload { get; private set; }

    /// <summary>Gives back every payload nobody took: lent blocks to the peer, our own blocks to our arena. Never throws.</summary>
    internal void ReleaseUntakenPayloads()
    {
        for (int i = 0; i < _payloadCount; i++)
        {
            ref ReceivedPayload payload = ref _payloads[i];
            if (!payload.Taken)
            {
                try
                {
                    if (payload.Streamed)
                    {
                        Progress(payload).CloseReader(); // nobody reads it: a sender waiting for ring room stops
                    }

                    Connection.ReleaseReceivedBlock(payload.Segment, payload.BlockOffset, payload.OwnArena);
                }
                finally
                {
                    payload.Segment.Release();
                }
            }

            payload = default;
        }

        _payloadCount = 0;
        HasPipelinedPayload = false;
    }

    /// <summary>Clears the message for reuse.</summary>
    protected void ResetMessage()
    {
        ReleaseUntakenPayloads();
        _bodyLength = 0;
        _bodyStart = 0;
        _metadataLength = 0;
        if (_body.Length > PooledBodyLimit)
        {
            ReturnLargeBody();
            _body = [];
        }
    }

    private void ReturnLargeBody()
    {
        if (_body.Length > PooledBodyLimit)
        {
            ArrayPool<byte>.Shared.Return(_body);
        }
    }
}

/// <summary>A received payload read without a copy: each call returns the next bytes in place, in shared memory (empty at the end).</summary>
internal interface IInPlaceReadable
{
    /// <summary>The next bytes that have landed (at most <paramref name="maxBytes"/>), valid until the next call or until the stream is disposed.</summary>
    ValueTask<ReadOnlyMemory<byte>> ReadInPlaceAsync(int maxBytes, CancellationToken cancellationToken);
}

/// <summary>Mapped shared memory as Memory, for chunks handed out in place; valid while the mapping reference behind it is held.</summary>
internal sealed unsafe class InPlaceMemory(byte* pointer, int length) : MemoryManager<byte>
{
    public override Span<byte> GetSpan() => new(pointer, length);

    public override MemoryHandle Pin(int elementIndex = 0) => new(pointer + elementIndex);

    public override void Unpin()
    {
    }

    protected override void Dispose(bool disposing)
    {
    }
}
