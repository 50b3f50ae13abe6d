using System.Buffers.Binary;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// No lost wake-ups. Spinning is switched off and futex sleeps never time out, so every hand-off goes
/// through the futex protocol and a single lost wake-up would hang the test (it then fails on its
/// time bound) instead of being papered over by a periodic re-check.
/// </summary>
public sealed class WakeupTests
{
    [Fact]
    public async Task Ring_with_four_producers_and_one_consumer_loses_and_duplicates_nothing()
    {
        ControlArea area = ControlArea.Create(new RingGeometry(256, 8, 8), "ring-test");
        try
        {
            const int Producers = 4;
            const int PerProducer = 50_000;
            ControlRing ring = area.Messages;
            var producers = new Task[Producers];
            for (int p = 0; p < Producers; p++)
            {
                int producer = p;
                producers[p] = Task.Factory.StartNew(() => Produce(area, producer, PerProducer), TaskCreationOptions.LongRunning);
            }

            var next = new int[Producers];
            Task consumer = Task.Factory.StartNew(() => Consume(area, next, Producers * PerProducer), TaskCreationOptions.LongRunning);

            await Task.WhenAll([.. producers, consumer]).WaitAsync(TimeSpan.FromMinutes(3));
            Assert.All(next, n => Assert.Equal(PerProducer, n));
            Assert.False(ring.HasMessage());
        }
        finally
        {
            area.Dispose();
        }
    }

    private static unsafe void Produce(ControlArea area, int producer, int count)
    {
        ControlRing ring = area.Messages;
        var spin = new AdaptiveSpin(TimeSpan.Zero);
        for (int i = 0; i < count; i++)
        {
            byte* slot;
            long position;
            while ((slot = ring.TryReserve(out position)) is null)
            {
                var space = new Space(ring);
                SharedWait.Wait(ref space, area.MessageProducerWake, spin, singleWaiter: false, sleepSliceMilliseconds: -1);
            }

            *(int*)(slot + 8) = producer;
            *(int*)(slot + 12) = i;
            ring.Publish(position);
            SharedWait.Wake(area.ConsumerWake);
        }
    }

    private static unsafe void Consume(ControlArea area, int[] next, int total)
    {
        ControlRing ring = area.Messages;
        var noSpin = new AdaptiveSpin(TimeSpan.Zero);
        var ready = new Ready(ring);
        for (int received = 0; received < total; received++)
        {
            byte* slot;
            while ((slot = ring.TryPeek()) is null)
            {
                SharedWait.Wait(ref ready, area.ConsumerWake, noSpin, singleWaiter: true, sleepSliceMilliseconds: -1);
            }

            int producer = *(int*)(slot + 8);
            int sequence = *(int*)(slot + 12);
            ring.Consume();
            SharedWait.Wake(area.MessageProducerWake);
            Assert.Equal(next[producer], sequence); // per producer, in order, none missing or repeated
            next[producer]++;
        }
    }

    private readonly struct Space(ControlRing ring) : IWaitCondition
    {
        public bool IsSatisfied() => ring.HasFreeSlot();

        public bool IsAbandoned() => false;
    }

    private readonly struct Ready(ControlRing ring) : IWaitCondition
    {
        public bool IsSatisfied() => ring.HasMessage();

        public bool IsAbandoned() => false;
    }

    [Fact]
    public async Task Cross_process_calls_with_futex_only_wakeups_all_complete()
    {
        await using RemoteServer server = RemoteServer.Start("wakeup", "--spin-us", "0", "--no-sleep-slice", "--slots", "4");
        await using RpcConnection connection = await server.ConnectAsync(new TransportOptions { SpinBudget = TimeSpan.Zero, SlotCount = 4, RunContinuationsAsynchronously = true, SleepSliceMilliseconds = -1 });
        const int Callers = 6;
        const int Calls = 3_000;
        var done = new int[Callers];
        await Task.WhenAll(Enumerable.Range(0, Callers).Select(c => Task.Run(async () =>
        {
            byte[] body = new byte[8];
            for (int i = 0; i < Calls; i++)
            {
                BinaryPrimitives.WriteInt32LittleEndian(body, c);
                BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(4), i);
                using RpcReply reply = await connection.CallAsync(Testing.PeerMethods.Echo, body, default);
                Assert.True(reply.Body.SequenceEqual(body));
                done[c]++;
            }
        }))).WaitAsync(TimeSpan.FromMinutes(4));
        Assert.All(done, n => Assert.Equal(Calls, n));
    }
}
