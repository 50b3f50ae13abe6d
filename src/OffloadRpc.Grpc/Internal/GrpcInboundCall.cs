using global::Grpc.Core;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>A request that came over gRPC, as the dispatcher and the generated stub see it.</summary>
internal sealed class GrpcInboundCall : IInboundCall, IDisposable
{
    private readonly MessageAssembler _message;
    private readonly CancellationTokenSource _cancellation;
    private readonly byte[]? _metadata;
    private readonly IServerStreamWriter<Frame> _responses;
    private readonly int _window;
    private OutgoingMessage? _reply;
    private StreamOutbox? _outbox;
    private System.Threading.Channels.Channel<OutgoingMessage>? _items;
    private Task? _writer;

    public GrpcInboundCall(int methodId, MessageAssembler message, ServerCallContext context, IServerStreamWriter<Frame> responses, int window)
    {
        MethodId = methodId;
        _message = message;
        _responses = responses;
        _window = window;
        _cancellation = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken);
        foreach (Metadata.Entry entry in context.RequestHeaders)
        {
            if (entry.IsBinary && entry.Key == GrpcWire.MetadataHeader)
            {
                _metadata = entry.ValueBytes;
            }
            else if (!entry.IsBinary && entry.Key == GrpcWire.PeerHeader)
            {
                string[] parts = entry.Value.Split(':');
                if (parts.Length == 2 && int.TryParse(parts[0], out int pid) && uint.TryParse(parts[1], out uint uid))
                {
                    PeerProcessId = pid;
                    PeerUserId = uid;
                }
            }
        }
    }

    public int MethodId { get; }

    public ReadOnlyMemory<byte> BodyMemory => _message.Body;

    public int PayloadCount => _message.PayloadCount;

    public CancellationToken CancellationToken => _cancellation.Token;

    /// <summary>What the caller says it is (its "offloadrpc-peer" header; -1 when absent). Not verified: a gRPC peer may be on another host.</summary>
    public int PeerProcessId { get; } = -1;

    public uint PeerUserId { get; } = uint.MaxValue;

    public bool HasMetadata => _metadata is not null;

    public ReadOnlyMemory<byte> Metadata => _metadata;

    public long PayloadBytes => _message.PayloadBytes;

    /// <summary>The call broke the protocol (arguments that do not decode): answered with status Internal.</summary>
    public ProtocolViolationException? Violation { get; private set; }

    public bool IsPayloadTaken(int index) => _message.IsTaken(index);

    public SharedBuffer TakePayload(int index) => _message.Take(index) ?? throw new ProtocolViolationException($"The request names payload {index} twice.");

    public Stream OpenPayloadStream(int index, CancellationToken cancellationToken) => new LeaseStream(TakePayload(index));

    /// <summary>Ordinary memory of this process: over gRPC a returned lease is copied into the reply.</summary>
    public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) => LocalLeases.Instance.Rent(bytes);

    public void Reply(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads)
    {
        if (_reply is not null)
        {
            throw new InvalidOperationException("The call was already answered.");
        }

        _reply = OutgoingMessage.Create(body, payloads);
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
            if (_outbox is null)
            {
                _outbox = new StreamOutbox();
                _outbox.Grant(_window);
                _items = System.Threading.Channels.Channel.CreateUnbounded<OutgoingMessage>(new() { SingleReader = true, SingleWriter = true });
                _writer = WriteItemsAsync(_items.Reader, _outbox);
            }

            return _outbox;
        }
    }

    /// <summary>Copies the item (its leases are taken over) and queues it for the writer: never more than the window are queued.</summary>
    public void SendStreamItem(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken)
    {
        _ = Outbox;
        OutgoingMessage item = OutgoingMessage.Create(body, payloads);
        if (!_items!.Writer.TryWrite(item))
        {
            item.Dispose();
            throw new OperationCanceledException("The stream's writer has stopped.");
        }
    }

    private async Task WriteItemsAsync(System.Threading.Channels.ChannelReader<OutgoingMessage> items, StreamOutbox credit)
    {
        try
        {
            await foreach (OutgoingMessage item in items.ReadAllAsync().ConfigureAwait(false))
            {
                using (item)
                {
                    foreach (Frame frame in item.Frames(FrameKind.ItemHead))
                    {
                        await _responses.WriteAsync(frame, _cancellation.Token).ConfigureAwait(false);
                    }
                }

                credit.Grant(1);
            }
        }
        catch
        {
            _cancellation.Cancel(); // the caller is gone or the write failed: the producer stops at its next credit wait
            while (items.TryRead(out OutgoingMessage? left))
            {
                left.Dispose();
            }

            throw;
        }
    }

    /// <summary>Waits for the items already produced to be written (before the reply or the fault, which end the stream).</summary>
    public async Task FinishItemsAsync()
    {
        if (_items is null)
        {
            return;
        }

        _items.Writer.TryComplete();
        await _writer!.ConfigureAwait(false);
    }

    public void CancelAfter(TimeSpan delay) => _cancellation.CancelAfter(delay);

    public void Dispose()
    {
        _reply?.Dispose();
        _message.Dispose();
        _cancellation.Dispose();
    }

    /// <summary>A read-only stream over a payload; closing it gives the lease back.</summary>
    private sealed class LeaseStream(SharedBuffer lease) : Stream
    {
        private long _position;

        public override bool CanRead => true;

        public override bool CanSeek => true;

        public override bool CanWrite => false;

        public override long Length => lease.Length;

        public override long Position
        {
            get => _position;
            set => _position = Math.Clamp(value, 0, lease.Length);
        }

        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

        public override int Read(Span<byte> buffer)
        {
            int n = (int)Math.Min(buffer.Length, lease.Length - _position);
            lease.Span.Slice((int)_position, n).CopyTo(buffer);
            _position += n;
            return n;
        }

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => ValueTask.FromResult(Read(buffer.Span));

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => Task.FromResult(Read(buffer, offset, count));

        public override long Seek(long offset, SeekOrigin origin)
        {
            Position = origin switch { SeekOrigin.Begin => offset, SeekOrigin.Current => _position + offset, _ => lease.Length + offset };
            return _position;
        }

        public override void Flush()
        {
        }

        public override void SetLength(long value) => throw new NotSupportedException();

        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

        protected override void Dispose(bool disposing)
        {
            lease.Dispose();
            base.Dispose(disposing);
        }
    }
}
