using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The payload arena against a fake peer: no second process, the peer's side played by the test.</summary>
public sealed class PayloadArenaTests
{
    private const long Segment = 2 << 20;

    [Fact]
    public async Task A_segment_announcement_does_not_hold_up_senders_of_existing_segments()
    {
        // Announcing a segment waits for the peer to map it (a socket round trip). Meanwhile another
        // sender whose block fits an existing segment must be served, not wait behind the announcement.
        var peer = new FakePeer();
        var arena = new PayloadArena(peer, Segment, 64 << 20, TimeSpan.FromSeconds(30), "unit");
        try
        {
            ArenaBlock first = arena.Allocate(1 << 20); // segment 1, announced at once
            peer.HoldAnnouncements = true;
            Task<ArenaBlock> grows = Task.Run(() => arena.Allocate(Segment)); // needs a second segment
            Assert.True(peer.AnnouncementStarted.Wait(TimeSpan.FromSeconds(30)));

            ArenaBlock fits = await Task.Run(() => arena.Allocate(4096)).WaitAsync(TimeSpan.FromSeconds(30));
            Assert.Equal(first.Segment.Id, fits.Segment.Id);
            Assert.False(grows.IsCompleted);

            peer.Release.Set();
            ArenaBlock grown = await grows.WaitAsync(TimeSpan.FromSeconds(30));
            Assert.NotEqual(first.Segment.Id, grown.Segment.Id);
            Assert.Equal(2 * Segment, arena.TotalBytes);
            foreach (ArenaBlock block in new[] { first, fits, grown })
            {
                arena.FreeLocal(block.Segment.Id, block.Offset);
                block.Segment.Release();
            }

            Assert.Equal(0, arena.UsedBytes);
        }
        finally
        {
            arena.Close();
        }
    }

    [Fact]
    public void A_failed_announcement_gives_back_the_segment_id_and_its_bytes()
    {
        var peer = new FakePeer { FailAnnouncements = true };
        var arena = new PayloadArena(peer, Segment, 4 * Segment, TimeSpan.FromSeconds(30), "unit");
        try
        {
            for (int i = 0; i < 10; i++)
            {
                Assert.Throws<PeerDisconnectedException>(() => arena.Allocate(4096));
            }

            Assert.Equal(0, arena.TotalBytes); // ten failures reserved nothing for good

            peer.FailAnnouncements = false;
            ArenaBlock block = arena.Allocate(4096);
            Assert.Equal(1, block.Segment.Id);
            arena.FreeLocal(block.Segment.Id, block.Offset);
            block.Segment.Release();
        }
        finally
        {
            arena.Close();
        }
    }

    private sealed class FakePeer : IArenaPeer
    {
        public volatile bool HoldAnnouncements;
        public volatile bool FailAnnouncements;

        public ManualResetEventSlim AnnouncementStarted { get; } = new();

        public ManualResetEventSlim Release { get; } = new();

        public bool IsClosed => false;

        public void ThrowIfClosed()
        {
        }

        public void WaitForSpace(PayloadArena arena, long freeGeneration, long deadline, CancellationToken cancellationToken) => Thread.Sleep(1);

        public void WakeSpaceWaiters()
        {
        }

        public void AnnounceSegment(SharedMemorySegment segment)
        {
            if (FailAnnouncements)
            {
                throw new PeerDisconnectedException("the fake peer refuses segments");
            }

            if (HoldAnnouncements)
            {
                AnnouncementStarted.Set();
                Assert.True(Release.Wait(TimeSpan.FromSeconds(60)));
            }
        }

        public void RetireSegment(int segmentId)
        {
        }

        public void DrainReleases(PayloadArena arena)
        {
        }
    }
}
