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

        SendControl(FrameType.AddSegment, frame, segment.Descriptor);
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
            SendControl(FrameType.RemoveSegment, frame, descriptor: null);
        }
        catch (OffloadRpcException)
        {
        }
    }

    /// <summary>Sends a frame, waiting at most the handshake timeout for room: a peer that stops reading its socket is disconnected.</summary>
    private void SendControl(FrameType type, ReadOnlySpan<byte> payload, Interop.SafeMemfdHandle? descriptor)
    {
        try
        {
            _channel.Send(type, payload, descriptor, _options.HandshakeTimeout);
        }
        catch (TimeoutException ex)
        {
            var violation = new ProtocolViolationException($"Protocol violation by peer process {Peer.ProcessId}: it stopped reading its socket ({ex.Message}). The connection is closed.", ex);
            Terminate(violation);
            throw violation;
        }
        catch (ObjectDisposedException ex)
        {
            throw new PeerDisconnectedException("The connection is closed.", ex);
        }
    }

    /// <summary>Peer segments this process maps, over all connections (the budget <see cref="TransportOptions.MaxMappedBytes"/>).</summary>
    private static long s_peerMappedBytes;

    private int _peerSegmentCount; // reactor thread only, then ReleaseResources
    private long _peerMappedBytes;

    /// <summary>Bytes of peers' segments this process holds mapped for its connections right now.</summary>
    internal static long PeerMappedBytes => Volatile.Read(ref s_peerMappedBytes);

    /// <summary>A peer segment leaves the connection: its bytes leave the budgets (leases may still keep the mapping a while).</summary>
    private void ForgetPeerSegment(SharedMemorySegment segment)
    {
        _peerSegmentCount--;
        _peerMappedBytes -= segment.Size;
        Interlocked.Add(ref s_peerMappedBytes, -segment.Size);
    }

    // ------------------------------------------------------------------ the socket: segments and liveness

    /// <summary>
    /// The reactor reports the socket (readable, hung up or shut down): handle every whole frame it holds,
    /// then ask to be reported again; at end of stream the peer is gone. Runs on the epoll thread, never
    /// blocks: frames are segment hand-overs and their acknowledgements.
    /// </summary>
    private void OnSocketReady(uint events)
    {
        bool stopped = true;
        try
        {
            while (true)
            {
                FrameStatus status = _channel.TryReceive(out FrameType type, out ReadOnlySpan<byte> payload, out ReceivedDescriptors descriptors);
                if (status == FrameStatus.WouldBlock)
                {
                    break;
                }

                if (status == FrameStatus.EndOfStream)
                {
                    Terminate(new PeerDisconnectedException($"The peer process {Peer.ProcessId} closed the connection (it exited or died)."));
                    return;
                }

                using (descriptors)
                {
                    HandleFrame(type, payload, descriptors); // takes the descriptors it keeps; the rest are closed here
                }
            }

            stopped = false;
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
            if (stopped)
            {
                _channel.Registration.Remove();
                PartStopped();
            }
            else
            {
                _channel.Registration.Arm(); // a shutdown by Terminate reports the socket again: it then reads end of stream
            }
        }
    }

    /// <summary>Handles one socket frame, taking from <paramref name="fds"/> the descriptors it keeps.</summary>
    internal void HandleFrame(FrameType type, ReadOnlySpan<byte> payload, in ReceivedDescriptors fds)
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

                // Budgets before anything is mapped: per peer (segments, bytes) and for all peers of the process.
                if (_peerSegmentCount >= _options.MaxPeerSegments)
                {
                    throw Violation($"a segment past its budget of {_options.MaxPeerSegments} segments");
                }

                if (size > 0 && _peerMappedBytes + size > _options.MaxPeerMappedBytes)
                {
                    throw Violation($"a segment of {size} bytes past its budget of {_options.MaxPeerMappedBytes} mapped bytes ({_peerMappedBytes} held)");
                }

                if (size > 0 && Interlocked.Add(ref s_peerMappedBytes, size) > _options.MaxMappedBytes)
                {
                    Interlocked.Add(ref s_peerMappedBytes, -size);
                    throw Violation($"a segment of {size} bytes while peers already have this process map {Volatile.Read(ref s_peerMappedBytes)} of at most {_options.MaxMappedBytes} bytes");
                }

                SharedMemorySegment segment;
                try
                {
                    // MapPeer owns the descriptor from here, whether it succeeds or not, and closes it once mapped.
                    segment = SharedMemorySegment.MapPeer(id, fds.Take(0), size, _options.MaxPeerSegmentBytes);
                }
                catch
                {
                    Interlocked.Add(ref s_peerMappedBytes, -Math.Max(size, 0));
                    throw;
                }

                _peerSegmentCount++;
                _peerMappedBytes += size;
                Volatile.Write(ref _peerSegments[id], segment); // the connection owns it now: RemoveSegment or ReleaseResources disposes it
                Span<byte> ack = stackalloc byte[4];
                BinaryPrimitives.WriteInt32LittleEndian(ack, id);
                // Never waits (this is the epoll thread): a peer that hands over segments without reading
                // our acknowledgements until its socket buffer is full is not following the protocol.
                try
                {
                    _channel.Send(FrameType.SegmentMapped, ack, descriptor: null, TimeSpan.Zero);
                }
                catch (TimeoutException)
                {
                    throw Violation("segment hand-overs without reading their acknowledgements");
                }

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

                ForgetPeerSegment(segment);
                segment.Dispose(); // the connection's (owner's) reference; payloads still held keep the mapping
                return;
            }

            default:
                throw Violation($"socket frame type {(int)type} after the handshake");
        }
    }
}
