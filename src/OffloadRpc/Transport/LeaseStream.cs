namespace OffloadRpc.Transport;

/// <summary>A complete payload as a read-only stream over its lease (either transport's); disposing it gives the lease back.</summary>
internal sealed unsafe class LeaseStream : UnmanagedMemoryStream, IInPlaceReadable
{
    private readonly SharedBuffer _lease;

    public LeaseStream(SharedBuffer lease)
        : base(lease.Segment.Base + lease.Offset, lease.Length) // the lease keeps the mapping alive until the stream is disposed
    {
        _lease = lease;
    }

    public ValueTask<ReadOnlyMemory<byte>> ReadInPlaceAsync(int maxBytes, CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(!_lease.IsValid, this);
        int count = (int)Math.Min(maxBytes, Length - Position);
        if (count <= 0)
        {
            return new ValueTask<ReadOnlyMemory<byte>>(ReadOnlyMemory<byte>.Empty);
        }

        ReadOnlyMemory<byte> chunk = new InPlaceMemory(PositionPointer, count).Memory;
        Position += count;
        return new ValueTask<ReadOnlyMemory<byte>>(chunk);
    }

    protected override void Dispose(bool disposing)
    {
        base.Dispose(disposing);
        _lease.Dispose();
    }
}
