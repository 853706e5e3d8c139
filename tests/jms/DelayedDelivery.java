// A guest application on Qpid JMS: sends one message with a delivery delay, then receives
// it. Qpid JMS refuses a delayed send unless the broker offered DELAYED_DELIVERY, in its open
// or (asked for in the producer's attach) on the link.
//
//   java -cp CLASSPATH DelayedDelivery.java amqp://HOST:PORT QUEUE DELAY_MS
//
// Prints "received TEXT after N ms"; exits 1 with the JMS error otherwise.

import jakarta.jms.Connection;
import jakarta.jms.JMSException;
import jakarta.jms.MessageConsumer;
import jakarta.jms.MessageProducer;
import jakarta.jms.Queue;
import jakarta.jms.Session;
import jakarta.jms.TextMessage;
import org.apache.qpid.jms.JmsConnectionFactory;

public class DelayedDelivery {
    public static void main(String[] args) throws Exception {
        JmsConnectionFactory factory = new JmsConnectionFactory(args[0]);
        long delay = Long.parseLong(args[2]);
        try (Connection connection = factory.createConnection()) {
            connection.start();
            Session session = connection.createSession(false, Session.AUTO_ACKNOWLEDGE);
            Queue queue = session.createQueue(args[1]);
            MessageProducer producer = session.createProducer(queue);
            producer.setDeliveryDelay(delay);
            long sent = System.currentTimeMillis();
            producer.send(session.createTextMessage("later"));
            MessageConsumer consumer = session.createConsumer(queue);
            TextMessage got = (TextMessage) consumer.receive(30000);
            if (got == null) {
                System.out.println("nothing received");
                System.exit(1);
            }
            System.out.println("received " + got.getText() + " after "
                + (System.currentTimeMillis() - sent) + " ms");
        } catch (JMSException e) {
            System.out.println("JMS error: " + e.getMessage());
            System.exit(1);
        }
    }
}
