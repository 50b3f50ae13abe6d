using System.Buffers.Binary;
using System.Diagnostics;

namespace OffloadRpc.Transport;

/// <summary>The socket side of a connection: this side's segments announced and retired, the peer's mapped and unmapped, and the peer's death noticed.</summary>
internal sealed partial class RpcConnection
{
    void IArenaPeer.AnnounceSegment(SharedMemorySegment segment)
    {
        ThrowIfClosed();
        Span<byte> frame = stackalloc byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(frame, segment.Id);
        BinaryPrimitives.WriteInt64LittleEndian(frame[4..], segment.Size);
        long expected;
        lock (_announceLock)
        {
            expected = ++_announcesSent;
        }

        _channel.Send(FrameType.AddSegment, frame, segment.Descriptor);
        long deadline = _options.HandshakeTimeout == Timeout.InfiniteTimeSpan ? long.MaxValue : Stopwatch.GetTimestamp() + (long)(_options.HandshakeTimeout.TotalSeconds * Stopwatch.Frequency);
        lock (_announceLock)
        {
            while (_announcesAcknowledged < expected)
            {
                ThrowIfClosed();
                if (Stopwatch.GetTimestamp() > deadline)
                {
                    var timeout = new ProtocolViolationException($"The peer did not map segment {segment.Id} within {_options.HandshakeTimeout.TotalSeconds:0.#} s.");
                    Terminate(timeout);
                    throw timeout;
                }

                Monitor.Wait(_announceLock, 50);
            }
        }
    }

    void IArenaPeer.RetireSegment(int segmentId)
    {
        Span<byte> frame = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(frame, segmentId);
        try
        {
            _channel.Send(FrameType.RemoveSegment, frame);
        }
        catch (OffloadRpcException)
        {
        }
    }

    // ------------------------------------------------------------------ the socket: segments and liveness

    private void SocketLoop()
    {
        try
        {
            while (true)
            {
                if (!_channel.TryReceive(out FrameType type, out ReadOnlySpan<byte> payload, out ReceivedDescriptors descriptors))
                {
                    Terminate(new PeerDisconnectedException($"The peer process {Peer.ProcessId} closed the connection (it exited or died)."));
                    return;
                }

                using (descriptors)
                {
                    HandleFrame(type, payload, descriptors); // takes the descriptors it keeps; the rest are closed here
                }
            }
        }
        catch (ProtocolViolationException ex)
        {
            Terminate(ex);
        }
        catch (Exception ex)
        {
            Terminate(new PeerDisconnectedException($"The connection to peer process {Peer.ProcessId} failed: {ex.Message}", ex));
        }
        finally
        {
            PartStopped();
        }
    }

    /// <summary>Handles one socket frame, taking from <paramref name="fds"/> the descriptors it keeps.</summary>
    private void HandleFrame(FrameType type, ReadOnlySpan<byte> payload, in ReceivedDescriptors fds)
    {
        switch (type)
        {
            case FrameType.AddSegment:
            {
                if (payload.Length != 12 || fds.Count != 1)
                {
                    throw Violation($"a segment hand-over of {payload.Length} bytes with {fds.Count} descriptors");
                }

                int id = BinaryPrimitives.ReadInt32LittleEndian(payload);
                long size = BinaryPrimitives.ReadInt64LittleEndian(payload[4..]);
                if (id <= 0 || id > PayloadArena.MaxSegments || Volatile.Read(ref _peerSegments[id]) is not null)
                {
                    throw Violation($"segment id {id}, which is out of range or in use");
                }

                // MapPeer owns the descriptor from here, whether it succeeds or not, and closes it once mapped.
                SharedMemorySegment segment = SharedMemorySegment.MapPeer(id, fds.Take(0), size, _options.MaxPeerSegmentBytes);
                Volatile.Write(ref _peerSegments[id], segment); // the connection owns it now: RemoveSegment or ReleaseResources disposes it
                Span<byte> ack = stackalloc byte[4];
                BinaryPrimitives.WriteInt32LittleEndian(ack, id);
                _channel.Send(FrameType.SegmentMapped, ack);
                return;
            }

            case FrameType.SegmentMapped:
                if (payload.Length != 4 || fds.Count != 0)
                {
                    throw Violation("a malformed segment acknowledgement");
                }

                lock (_announceLock)
                {
                    _announcesAcknowledged++;
                    Monitor.PulseAll(_announceLock);
                }

                return;

            case FrameType.RemoveSegment:
            {
                int id = payload.Length == 4 ? BinaryPrimitives.ReadInt32LittleEndian(payload) : -1;
                SharedMemorySegment? segment = id > 0 && id <= PayloadArena.MaxSegments ? Interlocked.Exchange(ref _peerSegments[id], null) : null;
                if (segment is null || fds.Count != 0)
                {
                    throw Violation($"the removal of unknown segment {id}");
                }

                segment.Dispose(); // the connection's (owner's) reference; payloads still held keep the mapping
                return;
            }

            default:
                throw Violation($"socket frame type {(int)type} after the handshake");
        }
    }
}
